"""A network of a user's own, registered from outside eqprop: Φ with lateral connections.

    Φ(x, s) = h·(W1 x + b1) + y·(W2 h + b2) + ½ h·(L h)

Only Φ is written; eqprop derives the dynamics and the gradients by autograd.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import PositiveInt
from torch import nn

from eqprop import ModelContext, ModelSection, PhiModel, register_model
from eqprop.initialization import init_linear_


class LateralConfig(ModelSection):
    kind: Literal["lateral_mlp"] = "lateral_mlp"
    inputs: PositiveInt = 784
    hidden: PositiveInt = 32
    classes: PositiveInt = 10
    lateral_scale: float = 0.05
    activation: str = "hard_sigmoid"


class LateralMLP(PhiModel):
    def __init__(self, section: LateralConfig, generator: torch.Generator) -> None:
        super().__init__({"h": section.hidden, "y": section.classes}, activation=section.activation)
        self.w1 = nn.Linear(section.inputs, section.hidden)
        self.w2 = nn.Linear(section.hidden, section.classes)
        init_linear_(self.w1.weight, self.w1.bias, generator)
        init_linear_(self.w2.weight, self.w2.bias, generator)
        lateral = torch.randn(section.hidden, section.hidden, generator=generator) * section.lateral_scale
        self.lateral = nn.Parameter(0.5 * (lateral + lateral.t()))

    def energy(self, x: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
        h, y = s["h"], s["y"]
        return (self.w1(x) * h).sum(1) + (self.w2(h) * y).sum(1) + 0.5 * ((h @ self.lateral) * h).sum(1)


@register_model("lateral_mlp", LateralConfig)
def build(section: LateralConfig, context: ModelContext) -> LateralMLP:
    return LateralMLP(section, context.generator)
