"""One-sided EP: free phase, one nudged phase at +β; ∇̂ = (G(s^β) - G(s*)) / β."""
from __future__ import annotations

import torch
from torch import Tensor

from ..models.base import Clamped, EnergyModel, State
from .base import Estimate, Estimator, ep_difference, register


@register("one_sided")
class OneSidedEP(Estimator):
    """The original EP estimate (Scellier & Bengio 2017); bias O(β)."""

    def beta(self) -> float:
        """The nudging strength of this batch (random-sign EP overrides it)."""
        return self.phases.beta

    @torch.no_grad()
    def estimate(self, model: EnergyModel, x: Tensor, target: Tensor, start: State | None = None) -> Estimate:
        clamped = model.clamp(x)
        free, free_stats = self.free_phase(model, clamped, start)
        beta = self.beta()
        nudged, nudged_stats = self.nudged_phase(model, clamped, free, beta, target)
        return Estimate(self.direction(model, clamped, target, free, nudged, beta), free, free_stats, nudged_stats)

    def direction(self, model: EnergyModel, clamped: Clamped, target: Tensor, free: State, nudged: State,
                  beta: float) -> list[Tensor]:
        """∇̂ from the free and nudged steady states (subclasses change the rule, not the phases)."""
        return ep_difference(model, clamped, target, (free, 0.0), (nudged, beta))
