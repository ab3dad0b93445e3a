"""Symmetric (three-phase) EP, Laborieux 2021 eq. 14.

Both nudged phases start from the free steady state s*:
``∇̂ = (G(s^{+β}) - G(s^{-β})) / (2β)``, whose bias is O(β²) instead of O(β).
The two nudged phases are independent, so they run side by side as one batch of
2B samples with a per-sample β: half the steps, each on a larger batch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..dynamics import run_phase
from ..models.base import EnergyModel
from .base import Estimate, Estimator, ep_difference, register


@register("symmetric")
class SymmetricEP(Estimator):
    """Free phase, then +β and -β nudged phases, each from s*."""

    @torch.no_grad()
    def estimate(self, model: EnergyModel, x: Tensor, target: Tensor) -> Estimate:
        clamped = model.clamp(x)
        free = self.free_phase(model, clamped)
        beta, batch = self.phases.beta, x.shape[0]
        signs = torch.ones(2 * batch, 1, dtype=x.dtype, device=x.device)
        signs[batch:] = -1.0
        both = run_phase(model, clamped.repeat_batch(2), [torch.cat([s, s]) for s in free], self.phases.t2,
                         signs * beta, torch.cat([target, target]))
        plus, minus = [s[:batch] for s in both], [s[batch:] for s in both]
        return Estimate(ep_difference(model, clamped, target, (minus, -beta), (plus, beta)), free)
