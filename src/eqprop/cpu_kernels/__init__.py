"""eqprop's C kernel for the phases of fully connected models on the CPU.

:class:`KernelPhases` is the phase runner the trainer uses on the CPU
(``train.cpu_kernels``), and :class:`KernelProducts` computes a fully connected
model's input drive and weight gradients on the same threads;
:func:`load_kernel` builds and loads the kernel.
"""
from .library import Kernel, KernelUnavailable, forget_loaded_kernels, load_kernel
from .products import KernelProducts
from .runner import KernelPhases, kernel_applies, kernel_runs_model

__all__ = ["Kernel", "KernelPhases", "KernelProducts", "KernelUnavailable", "forget_loaded_kernels",
           "kernel_applies", "kernel_runs_model", "load_kernel"]
