"""``tolerance`` and ``alternating``: iterate until every sample's residual is at most ``tol``.

The residual (the max-norm change of a sample's state in one step) is looked
at every ``check_every`` steps only: on a GPU each look is one host-device
synchronisation, so a phase pays one per check instead of one per step. The
cap is the phase's steps (``dynamics.t1``/``t2``); a phase that reaches it
without meeting ``tol`` stops there and says so (``converged`` False).
"""
from __future__ import annotations

from torch import Tensor

from ..dynamics import PhaseRunner
from ..models.base import Clamped, EnergyModel, State
from .base import Solver, SolverStats, register_solver


@register_solver("tolerance")
class Tolerance(Solver):
    """Plain synchronous iteration stopped at a residual tolerance."""

    config_fields = ("tol", "check_every")

    def __init__(self, runner: PhaseRunner | None = None, tol: float = 1e-4, check_every: int = 10) -> None:
        super().__init__(runner)
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        if int(check_every) < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.tol = float(tol)
        self.check_every = int(check_every)

    def options(self) -> dict[str, object]:
        return {"tol": self.tol, "check_every": self.check_every}

    def __call__(self, model: EnergyModel, clamped: Clamped, state: State, steps: int,
                 beta: float | Tensor = 0.0, target: Tensor | None = None) -> tuple[State, SolverStats]:
        if steps <= 0:
            return state, SolverStats(0, state[0].new_zeros(state[0].shape[0]), True)
        done = 0
        while True:
            chunk = min(self.check_every, steps - done)
            state, residual = self.plain_steps(model, clamped, state, chunk, beta, target)
            done += chunk
            converged = bool(residual.max() <= self.tol)  # the one synchronisation of a check
            if converged or done >= steps:
                return state, SolverStats(done, residual, converged)


@register_solver("alternating")
class Alternating(Tolerance):
    """Even layers then odd layers within each step, each from its freshest neighbours; the
    same stopping rule. A step is one sweep over all layers."""

    sweep = "alternating"
