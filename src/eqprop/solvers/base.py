"""The solver interface: how a phase reaches its steady state, and what it reports.

A solver is called like :func:`~eqprop.dynamics.run_phase`, ``solver(model,
clamped, state, steps, beta=0.0, target=None)``, with ``steps`` the cap on the
steps it may take, and returns ``(state, stats)``. It computes the model's steps
through a *runner* given when it is made (``run_phase``; the CUDA graphs or C
kernel of a backend, :mod:`eqprop.backends`), so every solver runs on every
backend. Register a new solver with :func:`register_solver`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal, TypeVar

import torch
from pydantic import BaseModel
from torch import Tensor

from ..dynamics import PhaseRunner, run_alternating, run_phase
from ..models.base import Clamped, EnergyModel, State
from ..registration import add_class, registered_class

Sweep = Literal["synchronous", "alternating"]
#: the eager runner of each sweep (a backend may replace it by a faster one)
EAGER_RUNNERS: dict[str, PhaseRunner] = {"synchronous": run_phase, "alternating": run_alternating}


@dataclass
class SolverStats:
    """What one phase cost and how close it got.

    ``steps``: steps (evaluations of the model's map) the phase ran, a host
    integer. ``residual``: per sample, the max-norm change of the state in the
    last step, ``[B]`` on the state's device (no synchronisation to read it);
    None where it is not measured (continual EP's nudged phase, which moves
    the weights at every step).
    ``converged``: whether every residual met the solver's tolerance (None for
    a solver without one, which never looks). ``fallbacks``: plain steps the
    Anderson safeguard took instead of an extrapolation, summed over samples (a
    0-d tensor on the device, 0 for the other solvers). ``excluded``: samples
    the estimator left out of this phase's update (a 0-d tensor; None for the
    estimators that never leave one out: all but C-EP and C-VF with ``settle_tol``).
    """

    steps: int
    residual: Tensor | None
    converged: bool | None = None
    fallbacks: Tensor | int = 0
    excluded: Tensor | None = None


def state_change(new: State, old: State) -> Tensor:
    """Per sample, the largest absolute change of any unit between two states, ``[B]``."""
    with torch.no_grad():
        return torch.stack([(a - b).abs().flatten(1).amax(dim=1) if a.shape[1:].numel() else
                            a.new_zeros(a.shape[0]) for a, b in zip(new, old)]).amax(dim=0)


class Solver(ABC):
    """Base class of the solvers: the runner of steps, and the call that returns ``(state, stats)``."""

    name: ClassVar[str]
    #: the sweep whose runner it needs (a backend gives its fastest runner of that sweep); a
    #: solver whose sweep is an option sets it per instance before calling this constructor
    sweep: Sweep = "synchronous"
    #: fields of the ``solver`` configuration section passed to the constructor as keywords
    config_fields: ClassVar[tuple[str, ...]] = ()
    #: a solver's own settings: a pydantic model whose fields the configuration gives as
    #: ``solver.options`` (for the free phase's solver, ``solver.name``), passed as keywords
    options_schema: ClassVar[type[BaseModel] | None] = None

    def __init__(self, runner: PhaseRunner | None = None) -> None:
        #: ``runner(model, clamped, state, n, beta, target)`` runs n plain steps of :attr:`sweep`
        self.runner: PhaseRunner = runner or EAGER_RUNNERS[self.sweep]

    @abstractmethod
    def __call__(self, model: EnergyModel, clamped: Clamped, state: State, steps: int,
                 beta: float | Tensor = 0.0, target: Tensor | None = None) -> tuple[State, SolverStats]:
        """Run the phase from ``state`` for at most ``steps`` steps; return the final state and stats."""

    def run_in_one_call(self, model: EnergyModel, clamped: Clamped, state: State, steps: int,
                        beta: float | Tensor, target: Tensor | None, tol: float,
                        check_every: int) -> tuple[State, Tensor, Tensor] | None:
        """The whole phase in one call of a runner that can stop samples at a tolerance itself
        (a runner with ``run_until``: eqprop's C kernel), as ``(state, residual, steps per
        sample)``; None where the runner has no such call or it does not apply to this phase."""
        run_until = getattr(self.runner, "run_until", None)
        if run_until is None:
            return None
        return run_until(model, clamped, state, steps, beta, target, tol, check_every)

    def plain_steps(self, model: EnergyModel, clamped: Clamped, state: State, steps: int,
                    beta: float | Tensor, target: Tensor | None) -> tuple[State, Tensor]:
        """``steps`` (≥ 1) plain steps through the runner; the state and the last step's residual.
        The last step runs as its own call so that its change can be measured: for every runner,
        n - 1 steps then 1 step compute exactly what n steps do."""
        before = self.runner(model, clamped, state, steps - 1, beta, target)
        after = self.runner(model, clamped, before, 1, beta, target)
        return after, state_change(after, before)


SOLVERS: dict[str, type[Solver]] = {}
S = TypeVar("S", bound=type[Solver])


def register_solver(name: str) -> Callable[[S], S]:
    """Class decorator: make a solver available by ``name`` (``solver.name`` in configs; a name taken
    by another solver is refused)."""
    def add(cls: S) -> S:
        return add_class(SOLVERS, "solver", name, cls)
    return add


def solver_class(name: str) -> type[Solver]:
    """The solver class registered as ``name``."""
    return registered_class(SOLVERS, "solver", name)


def build_solver(name: str, runner: PhaseRunner | None = None, **options: object) -> Solver:
    """The solver registered as ``name`` with its own ``options`` (e.g. ``tol``), computing its
    steps with ``runner`` (None: PyTorch's eager steps of the solver's sweep)."""
    cls = solver_class(name)
    try:
        return cls(runner, **options)
    except TypeError as error:
        raise ValueError(f"solver {name}: {error}") from None
