"""Running a phase: T steps of a model's dynamics from a given state.

Pure functions of their inputs; β is a Python float (or a per-sample tensor)
so that no host-device synchronisation happens inside the loops. Two sweeps
exist: :func:`run_phase`, the papers' synchronous update (every layer from the
state at step t), and :func:`run_alternating`, even layers then odd layers,
each from the freshest values of its neighbours. Both have the same fixed
points; solvers (:mod:`eqprop.solvers`) choose between them and decide when
to stop.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .models.base import Clamped, EnergyModel, State

#: the signature of :func:`run_phase`, which :class:`~eqprop.cuda_graphs.PhaseGraphs` and
#: :class:`~eqprop.cpu_kernels.KernelPhases` share: ``(model, clamped, state, steps, beta, target)``
PhaseRunner = Callable[..., State]


def run_phase(model: EnergyModel, clamped: Clamped, state: State, steps: int,
              beta: float | Tensor = 0.0, target: Tensor | None = None) -> State:
    """Run ``steps`` synchronous steps (nudged when β ≠ 0) and return the final state."""
    for _ in range(steps):
        state = model.step(clamped, state, beta, target)
    return state


def run_alternating(model: EnergyModel, clamped: Clamped, state: State, steps: int,
                    beta: float | Tensor = 0.0, target: Tensor | None = None) -> State:
    """Run ``steps`` alternating sweeps: the even layers (0, 2, ... of the state) from the
    current state, then the odd layers from the even layers just computed. For a layered Φ
    each half-sweep is exact for the layers it updates (they do not interact), and a sweep
    costs one synchronous step where the model implements
    :meth:`~eqprop.models.base.EnergyModel.half_step` in closed form."""
    for _ in range(steps):
        state = model.half_step(clamped, state, 0, beta, target)
        state = model.half_step(clamped, state, 1, beta, target)
    return state


def record_phase(model: EnergyModel, clamped: Clamped, state: State, steps: int,
                 beta: float = 0.0, target: Tensor | None = None) -> list[Tensor]:
    """Like :func:`run_phase` but return the trajectory: per layer ``[steps + 1, B, ...]``,
    index 0 being the starting state (for analysis and plots)."""
    trajectory = [state]
    for _ in range(steps):
        state = model.step(clamped, state, beta, target)
        trajectory.append(state)
    return [torch.stack(layer) for layer in zip(*trajectory)]
