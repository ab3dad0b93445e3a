"""Running a phase: T steps of a model's dynamics from a given state.

Pure function of its inputs; β is a Python float so that no host-device
synchronisation happens inside the loop.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .models.base import Clamped, EnergyModel, State

#: the signature of :func:`run_phase`, which :class:`~eqprop.cuda_graphs.PhaseGraphs` shares
PhaseRunner = Callable[..., State]


def run_phase(model: EnergyModel, clamped: Clamped, state: State, steps: int,
              beta: float = 0.0, target: Tensor | None = None) -> State:
    """Run ``steps`` synchronous steps (nudged when β ≠ 0) and return the final state."""
    for _ in range(steps):
        state = model.step(clamped, state, beta, target)
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
