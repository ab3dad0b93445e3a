"""An estimator of a user's own with its own settings (``estimator.options``), registered from outside."""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, PositiveFloat

from eqprop import Estimate, Estimator, build_estimator, register


class ScaledOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: PositiveFloat = 1.0


@register("scaled_symmetric")
class ScaledSymmetric(Estimator):
    """Symmetric EP's estimate times ``scale``."""

    options_schema = ScaledOptions

    def __init__(self, phases, generator=None, scale: float = 1.0):
        super().__init__(phases, generator)
        self.scale = scale
        self.inner = build_estimator("symmetric", phases, generator)

    @torch.no_grad()
    def estimate(self, model, x, target, start=None):
        result = self.inner.estimate(model, x, target, start)
        return Estimate([self.scale * d for d in result.direction], result.free_state, result.free_stats,
                        result.nudged_stats)
