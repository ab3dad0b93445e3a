"""BPTT baseline: backpropagation through the last K steps of the free phase.

The loss is read at the final free state s_{T1}. The first T1 - K steps run
without a graph; the last K steps run the same closed-form dynamics with
autograd recording, then one backward pass gives -∇̂. ``steps=None`` means
K = T2 (the authors' code), ``"all"`` means K = T1 (full BPTT); configured
by ``estimator.bptt_steps``.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..dynamics import run_phase
from ..models.base import EnergyModel, State
from .base import Estimate, Estimator, Phases, register


@register("bptt")
class BPTT(Estimator):
    """Truncated (or full) backpropagation through time of the free dynamics."""

    models = "any"

    config_fields = ("bptt_steps",)

    def __init__(self, phases: Phases, generator: torch.Generator | None = None,
                 bptt_steps: int | Literal["all"] | None = None) -> None:
        super().__init__(phases, generator)
        if bptt_steps == "all":
            bptt_steps = phases.t1
        self.steps = min(phases.t2 if bptt_steps is None else int(bptt_steps), phases.t1)

    def estimate(self, model: EnergyModel, x: Tensor, target: Tensor, start: State | None = None) -> Estimate:
        params = model.trainable_parameters()
        with torch.enable_grad():
            clamped = model.clamp(x)  # once per batch: a dropout mask stays the same for all steps
            with torch.no_grad():  # the untracked part of the free phase, by the run's solver
                state, stats = self.phases.free_solver()(model, clamped, model.init_state(x) if start is None
                                                         else start, self.phases.t1 - self.steps)
            state = run_phase(model, clamped, state, self.steps)
            loss = model.head.loss(state[-1], target).mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        direction = [torch.zeros_like(p) if g is None else g.neg() for p, g in zip(params, grads)]
        stats.steps += self.steps
        return Estimate(direction, [s.detach() for s in state], stats)
