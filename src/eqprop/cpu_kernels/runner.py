""":class:`KernelPhases`: the phases of fully connected models run by the C kernel on the CPU.

A drop-in :data:`~eqprop.dynamics.PhaseRunner` (the estimators' ``run_phase``):
where the kernel computes exactly what :meth:`PMLP.step <eqprop.models.mlp.PMLP.step>`
would (a P-MLP or VF-MLP whose step is not overridden, the squared-error or
softmax-readout head, a sigmoid or hard-sigmoid activation, float32 or
float64 on the CPU, no autograd, no autocast), the whole phase is one kernel call, the batch's rows
split across ``threads`` threads; anything else runs
through :func:`~eqprop.dynamics.run_phase` unchanged. The results agree with
PyTorch's to rounding (sums are taken in another order, and float32's exp is
the kernel's own, within about an ulp).
"""
from __future__ import annotations

import ctypes
import math
import os
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..dynamics import run_alternating, run_phase
from ..heads import SoftmaxReadout, SquaredError
from ..models.base import Clamped, EnergyModel, State, is_free
from ..models.mlp import MLPClamped, PMLP
from .library import Kernel, KernelUnavailable, check_status, kernel_dtypes, kernel_reads, load_kernel
from .products import KernelProducts

_CORES = {"sigmoid": 0, "clamp01": 1}
_HEADS = (SquaredError, SoftmaxReadout)
#: the kernel's own limit on threads (MAX_THREADS in mlp_phase.c)
MAX_THREADS = 64


def kernel_runs_model(model: EnergyModel) -> bool:
    """Whether the kernel implements this model's steps: the model declares the path
    (:meth:`~eqprop.models.base.EnergyModel.fast_paths`), with a head and an activation the
    kernel has (the tensors are checked at each phase)."""
    return ("c_kernel" in model.fast_paths() and type(model.head) in _HEADS
            and model.activation.kernel_core in _CORES)


def kernel_applies(model: EnergyModel, clamped: Clamped, state: State) -> bool:
    """Whether the kernel computes exactly this phase of the model (else it runs in PyTorch)."""
    if not (kernel_runs_model(model) and isinstance(clamped, MLPClamped)):
        return False
    if torch.is_grad_enabled():
        return False
    head = model.head
    readout = (head.linear.weight, head.linear.bias) if isinstance(head, SoftmaxReadout) else ()
    return (len(state) == len(clamped.offsets)
            and kernel_reads([*state, *clamped.offsets, *clamped.weights[1:], *clamped.top_down, *readout])
            and all(s.dim() == 2 and s.shape[0] == state[0].shape[0] for s in state))


class KernelPhases:
    """Run phases with the C kernel where it applies, else with :func:`~eqprop.dynamics.run_phase`
    (or :func:`~eqprop.dynamics.run_alternating` for alternating sweeps).

    Args:
        threads: threads that share a batch (each takes at least 4 samples, 64 at most);
            None: one per core this process may use. The kernel's threads spin briefly
            between phases (yielding to anything else runnable), so PyTorch's own thread
            pool is best kept to one thread beside them: two pools spinning on the same
            cores slow each other down.
        sweep: ``"synchronous"`` steps (the papers' dynamics) or ``"alternating"`` sweeps
            (even layers, then odd layers; :meth:`PMLP.half_step <eqprop.models.mlp.PMLP.half_step>`).
    """

    def __init__(self, threads: int | None = None, sweep: str = "synchronous") -> None:
        if sweep not in ("synchronous", "alternating"):
            raise ValueError(f"sweep must be synchronous or alternating, got {sweep!r}")
        self.sweep = sweep
        self._eager = run_phase if sweep == "synchronous" else run_alternating
        self.threads = min(threads or available_cores(), MAX_THREADS)
        #: why the kernel could not be built, per floating type (those phases run in PyTorch)
        self.unavailable: dict[torch.dtype, str] = {}
        #: a fully connected model's drive and weight gradients on the same kernel and threads
        self.products = KernelProducts(self.kernel_for, self.threads)

    def set_threads(self, threads: int) -> None:
        """Share the next phases and products among ``threads`` threads. Each thread computes whole
        samples (phases) or whole output rows (products), so results do not depend on the count."""
        self.threads = self.products.threads = max(1, min(int(threads), MAX_THREADS))

    def __call__(self, model: EnergyModel, clamped: Clamped, state: State, steps: int,
                 beta: float | Tensor = 0.0, target: Tensor | None = None) -> State:
        result = self.run_until(model, clamped, state, steps, beta, target)
        if result is not None:
            return result[0]
        return self._eager(model, clamped, state, steps, beta, target)

    def run_until(self, model: EnergyModel, clamped: Clamped, state: State, steps: int,
                  beta: float | Tensor = 0.0, target: Tensor | None = None, tol: float = 0.0,
                  check_every: int = 1) -> tuple[State, Tensor, Tensor] | None:
        """At most ``steps`` steps in one kernel call, each sample stopping at the first check
        (every ``check_every`` steps) where its residual is at most ``tol`` (``tol`` 0: every
        sample runs ``steps`` steps). Returns the final state, each sample's residual at its
        last step and its steps (``[B]`` CPU tensors), or None where the kernel does not apply
        (the caller then runs the phase in PyTorch)."""
        if not kernel_applies(model, clamped, state):
            return None
        kernel = self.kernel_for(state[0].dtype)
        if kernel is None:
            return None
        return self._run(kernel, model, clamped, state, steps, beta, target, tol, check_every)

    def prepare(self, model: EnergyModel) -> None:
        """Build the kernel now if it will run this model's phases (so that the first epoch's
        time does not include the build)."""
        parameter = next(model.parameters(), None)
        if kernel_runs_model(model) and parameter is not None and parameter.dtype in kernel_dtypes():
            self.kernel_for(parameter.dtype)

    def kernel_for(self, dtype: torch.dtype) -> Kernel | None:
        """The kernel for ``dtype``; None (once warned) where it cannot be built."""
        if dtype in self.unavailable:
            return None
        try:
            return load_kernel(dtype)
        except KernelUnavailable as error:
            self.unavailable[dtype] = str(error)
            warnings.warn(f"eqprop: warning: {error}; the phases run in PyTorch instead", RuntimeWarning,
                          stacklevel=3)
            return None

    def _run(self, kernel: Kernel, model: PMLP, clamped: MLPClamped, state: State, steps: int,
             beta: float | Tensor, target: Tensor | None, tol: float = 0.0,
             check_every: int = 1) -> tuple[State, Tensor, Tensor] | None:
        """The phase by the kernel, or None where β or the target are not what it takes (another
        shape or device: PyTorch's step then decides what they mean)."""
        batch, dtype = state[0].shape[0], state[0].dtype
        sizes = [s.shape[1] for s in state]
        if any(isinstance(t, Tensor) and t.device.type != "cpu" for t in (beta, target)):
            return None
        head = model.head
        readout = head.linear if isinstance(head, SoftmaxReadout) else None
        betas = _per_sample_beta(beta, batch, dtype)
        target_shape = (batch, head.classes if readout is not None else sizes[-1])
        if betas is False or (betas is not None and (target is None or target.shape != target_shape)):
            return None
        targets = None if betas is None else target.to(dtype).contiguous()
        readout_weight = None if readout is None else readout.weight.contiguous()
        offsets = [clamped.offsets[0].contiguous()] + [o.reshape(-1).contiguous() for o in clamped.offsets[1:]]
        weights = [None] + [w.contiguous() for w in clamped.weights[1:]]  # W_1: its drive is in the offset
        top_down = [t.contiguous() for t in clamped.top_down]
        _check_shapes(sizes, batch, offsets, weights, top_down)
        initial = [s.contiguous() for s in state]
        final = [torch.empty(batch, n, dtype=dtype) for n in sizes]
        residual = torch.empty(batch, dtype=dtype)
        taken = torch.empty(batch, dtype=torch.int64)
        status = kernel.phase(len(sizes), _array(ctypes.c_int64, sizes), _pointers(weights),
                              _pointers(top_down + [None]), _pointers(offsets), model.activation.scale,
                              _CORES[model.activation.kernel_core], None if betas is None else betas.data_ptr(),
                              None if targets is None else targets.data_ptr(), int(head.nudge_inside),
                              0 if readout is None else head.classes,
                              None if readout is None else readout_weight.data_ptr(),
                              None if readout is None else readout.bias.data_ptr(),
                              _pointers(initial), _pointers(final), batch, max(steps, 0),
                              int(self.sweep == "alternating"), float(tol), max(int(check_every), 1),
                              residual.data_ptr(), taken.data_ptr(), self.threads)
        check_status(status)
        return final, residual, taken


def idle_cores(window: float = 0.1) -> int:
    """The cores of :func:`available_cores` that other processes leave idle, at least 1: the
    machine's busy CPU time over ``window`` seconds (``/proc/stat``, the hypervisor's steal
    included) less this process's own. Where ``/proc/stat`` cannot be read, every available core."""
    cores = available_cores()
    try:
        before, own_before, start = _busy_seconds(), time.process_time(), time.perf_counter()
        time.sleep(window)
        after, own_after, elapsed = _busy_seconds(), time.process_time(), time.perf_counter() - start
    except (OSError, ValueError, IndexError):
        return cores
    others = max(0.0, (after - before) - (own_after - own_before)) / elapsed  # cores kept busy by others
    return max(1, min(cores, round((os.cpu_count() or cores) - others)))


def _busy_seconds() -> float:
    """CPU seconds spent busy so far, all cores together (user, nice, system, irq, softirq, steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a container's CPU quota
    (cgroup v2 ``cpu.max``), since threads beyond the quota only wait for each other."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def _per_sample_beta(beta: float | Tensor, batch: int, dtype: torch.dtype) -> Tensor | None | bool:
    """β as a contiguous ``[batch]`` tensor; None for the free phase; False for another shape
    (PyTorch's step then decides what it means)."""
    if is_free(beta):
        return None
    values = torch.as_tensor(beta, dtype=dtype, device="cpu")
    if values.numel() == 1:
        return values.reshape(1).expand(batch).contiguous()
    if values.shape == (batch, 1):  # one β per sample, as the heads' nudge broadcasts it
        return values.reshape(batch).contiguous()
    return False


def _check_shapes(sizes: list[int], batch: int, offsets: list[Tensor], weights: list[Tensor | None],
                  top_down: list[Tensor]) -> None:
    """The clamped input must describe the state's layers (a mismatch is a bug in the model)."""
    expected = ([(batch, sizes[0])] + [(n,) for n in sizes[1:]]
                + [(n, below) for n, below in zip(sizes[1:], sizes[:-1])]
                + [(above, n) for n, above in zip(sizes[:-1], sizes[1:])])
    found = [tuple(t.shape) for t in (*offsets, *weights[1:], *top_down)]
    if found != expected:
        raise ValueError(f"the clamped input does not match the state's layers {sizes}: {found}")


def _pointers(tensors: list[Tensor | None]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[0 if t is None else t.data_ptr() for t in tensors])


def _array(kind: type, values: list[int]) -> ctypes.Array:
    return (kind * len(values))(*values)
