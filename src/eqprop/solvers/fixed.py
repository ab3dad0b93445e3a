"""``fixed``: the papers' dynamics, exactly T synchronous steps (the default everywhere).

Its state is bit-identical to :func:`~eqprop.dynamics.run_phase` for the same
steps; it also measures the last step's change, which tells how far from its
steady state the paper's fixed T left the phase.
"""
from __future__ import annotations

from torch import Tensor

from ..models.base import Clamped, EnergyModel, State
from .base import Solver, SolverStats, register_solver


@register_solver("fixed")
class FixedSteps(Solver):
    """Plain synchronous iteration for exactly ``steps`` steps."""

    def __call__(self, model: EnergyModel, clamped: Clamped, state: State, steps: int,
                 beta: float | Tensor = 0.0, target: Tensor | None = None) -> tuple[State, SolverStats]:
        if steps <= 0:
            return state, SolverStats(0, state[0].new_zeros(state[0].shape[0]))
        whole = self.run_in_one_call(model, clamped, state, steps, beta, target, 0.0, steps)
        if whole is not None:
            return whole[0], SolverStats(steps, whole[1])
        final, residual = self.plain_steps(model, clamped, state, steps, beta, target)
        return final, SolverStats(steps, residual)
