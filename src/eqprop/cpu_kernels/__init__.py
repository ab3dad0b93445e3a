"""eqprop's C kernel for the phases of fully connected models on the CPU.

:class:`KernelPhases` is the phase runner the trainer uses on the CPU
(``train.cpu_kernels``); :func:`load_kernel` builds and loads the kernel.
"""
from .library import KernelUnavailable, forget_loaded_kernels, load_kernel
from .runner import KernelPhases, kernel_applies, kernel_runs_model

__all__ = ["KernelPhases", "KernelUnavailable", "forget_loaded_kernels", "kernel_applies", "kernel_runs_model",
           "load_kernel"]
