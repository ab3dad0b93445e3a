"""Symmetric (three-phase) EP, Laborieux 2021 eq. 14.

Both nudged phases start from the free steady state s*:
``∇̂ = (G(s^{+β}) - G(s^{-β})) / (2β)``, whose bias is O(β²) instead of O(β).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models.base import Clamped, EnergyModel, State
from .base import Estimate, Estimator, ep_difference, register


@register("symmetric")
class SymmetricEP(Estimator):
    """Free phase, then +β and -β nudged phases, each from s*."""

    @torch.no_grad()
    def estimate(self, model: EnergyModel, x: Tensor, target: Tensor, start: State | None = None) -> Estimate:
        clamped = model.clamp(x)
        free, free_stats = self.free_phase(model, clamped, start)
        plus, minus, nudged_stats = self.symmetric_phases(model, clamped, free, target)
        return Estimate(self.direction(model, clamped, target, plus, minus), free, free_stats, nudged_stats)

    def direction(self, model: EnergyModel, clamped: Clamped, target: Tensor, plus: State,
                  minus: State) -> list[Tensor]:
        """∇̂ from the +β and -β steady states (subclasses change the rule, not the phases)."""
        beta = self.phases.beta
        return ep_difference(model, clamped, target, (minus, -beta), (plus, beta))
