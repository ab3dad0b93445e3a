"""``tolerance`` and ``alternating``: iterate until every sample's residual is at most ``tol``.

The residual (the max-norm change of a sample's state in one step) is looked
at every ``check_every`` steps only: on a GPU each look is one host-device
synchronisation, so a phase pays one per check instead of one per step. A
sample whose residual meets ``tol`` at a check stops there: its state is the
one of that check, whatever the other samples of the batch still do, so a
sample's result depends on nothing but itself (and equals on every backend:
eqprop's C kernel stops such samples and stops computing them; PyTorch keeps
computing the batch and keeps their states). The phase ends when every sample
has stopped, or at the cap, the phase's steps (``dynamics.t1``/``t2``); a
phase that reaches it without meeting ``tol`` says so (``converged`` False),
and is then exactly the papers' fixed-step phase.
"""
from __future__ import annotations

import torch
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

    def __call__(self, model: EnergyModel, clamped: Clamped, state: State, steps: int,
                 beta: float | Tensor = 0.0, target: Tensor | None = None) -> tuple[State, SolverStats]:
        if steps <= 0:
            return state, SolverStats(0, state[0].new_zeros(state[0].shape[0]), True)
        whole = self.run_in_one_call(model, clamped, state, steps, beta, target, self.tol, self.check_every)
        if whole is not None:
            final, residual, taken = whole
            return final, SolverStats(int(taken.max()), residual, bool(residual.max() <= self.tol))
        done = 0
        final: State = []
        while True:
            chunk = min(self.check_every, steps - done)
            state, residual = self.plain_steps(model, clamped, state, chunk, beta, target)
            done += chunk
            if not final:
                final, final_residual, stopped = state, residual, residual <= self.tol
            else:  # the samples stopped at an earlier check keep their state and residual there
                final = [torch.where(stopped.view(-1, *[1] * (s.dim() - 1)), f, s) for f, s in zip(final, state)]
                final_residual = torch.where(stopped, final_residual, residual)
                stopped = stopped | (residual <= self.tol)
            if done >= steps or bool(stopped.all()):  # the one synchronisation of a check
                return final, SolverStats(done, final_residual, bool(final_residual.max() <= self.tol))


@register_solver("alternating")
class Alternating(Tolerance):
    """Even layers then odd layers within each step, each from its freshest neighbours; the
    same stopping rule. A step is one sweep over all layers."""

    sweep = "alternating"
