"""Backends: what computes a phase's steps (PyTorch eagerly, CUDA graphs, or eqprop's C kernel).

A backend gives a solver (:mod:`eqprop.solvers`) its runner of plain steps
for a sweep, and a fully connected model the products it computes around the
phases (its input drive and weight gradients). :func:`~eqprop.build.build_run`
chooses one from the configuration and hands it to the objects that use it
when they are made; where a backend cannot run a solver's sweep, the solver
gets PyTorch's eager runner and the run says so in one line.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from .cpu_kernels import KernelPhases
from .cpu_kernels.runner import idle_cores
from .cuda_graphs import PhaseGraphs
from .dynamics import PhaseRunner
from .models.base import EnergyModel
from .models.products import DenseProducts
from .solvers.base import EAGER_RUNNERS, Sweep


class Backend:
    """PyTorch's eager steps (the reference every other backend equals to rounding)."""

    name: ClassVar[str] = "eager"

    def supports(self, sweep: Sweep) -> bool:
        """Whether this backend runs ``sweep`` itself (else the solver runs it eagerly)."""
        return sweep in EAGER_RUNNERS

    def runner(self, sweep: Sweep) -> PhaseRunner:
        """The runner of ``sweep``'s plain steps (eager where :meth:`supports` is False)."""
        return EAGER_RUNNERS[sweep]

    @property
    def products(self) -> DenseProducts | None:
        """A fully connected model's drive and gradient products (None: the model's own)."""
        return None

    def prepare(self, model: EnergyModel) -> None:
        """Build whatever the backend needs for ``model`` before any clock starts."""

    def before_epoch(self) -> None:
        """Adapt to the machine before an epoch (nothing here)."""


class CudaGraphsBackend(Backend):
    """Phases captured once as CUDA graphs and replayed (:class:`~eqprop.cuda_graphs.PhaseGraphs`)."""

    name = "cuda_graphs"

    def __init__(self) -> None:
        self._graphs = {sweep: PhaseGraphs(phase=phase) for sweep, phase in EAGER_RUNNERS.items()}

    def runner(self, sweep: Sweep) -> PhaseRunner:
        return self._graphs[sweep]


class CpuKernelBackend(Backend):
    """eqprop's C kernel for fully connected models on the CPU, synchronous steps and alternating
    sweeps (every other model or phase falls back to PyTorch inside
    :class:`~eqprop.cpu_kernels.KernelPhases`)."""

    name = "cpu_kernel"

    def __init__(self, threads: int | Literal["auto"] | None = None) -> None:
        """``threads``: the kernel's threads; None: every core this process may use; ``"auto"``: the
        cores other processes leave idle, measured again before every epoch (results do not depend
        on the count, only speed: on a loaded machine, threads that wait for a busy core at every
        step lose to fewer threads)."""
        self.adaptive = threads == "auto"
        count = idle_cores() if threads == "auto" else threads
        self.phases = KernelPhases(count)
        self._sweeps = {"synchronous": self.phases, "alternating": KernelPhases(count, "alternating")}

    @property
    def threads(self) -> int:
        """The kernel's threads now."""
        return self.phases.threads

    def before_epoch(self) -> None:
        if self.adaptive:
            count = idle_cores()
            for phases in self._sweeps.values():
                phases.set_threads(count)

    def runner(self, sweep: Sweep) -> PhaseRunner:
        return self._sweeps[sweep]

    @property
    def products(self) -> DenseProducts:
        return self.phases.products

    def prepare(self, model: EnergyModel) -> None:
        self.phases.prepare(model)
