"""A network of your own, written as its primitive Φ: a hidden layer with lateral connections.

    Φ(x, s) = h·(W1 x + b1) + y·(W2 h + b2) + ½ h·(L h)

eqprop derives the dynamics s ← σ(∂Φ/∂s) and the gradients ∂Φ/∂θ by autograd.
This file is also a plugin: registered as model kind ``lateral``, the network
trains, resumes, evaluates and runs the GDU check from the command line:

    eqprop train --config examples/lateral.yaml --set model.hidden=128
    eqprop gdu --config examples/lateral.yaml --batch-size 8

Run as a script, it trains a few epochs on the shipped mnist-demo subset
(``--quick``: a few batches).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import PositiveInt
from torch import nn

from eqprop import ModelContext, ModelSection, PhiModel, register_model
from eqprop.initialization import init_linear_


class LateralConfig(ModelSection):
    """The ``model`` section of kind ``lateral``."""

    kind: Literal["lateral"] = "lateral"
    inputs: PositiveInt = 784
    hidden: PositiveInt = 256
    classes: PositiveInt = 10
    lateral_scale: float = 0.01
    activation: str = "hard_sigmoid"


class Lateral(PhiModel):
    def __init__(self, config: LateralConfig, generator: torch.Generator | None = None) -> None:
        super().__init__({"h": config.hidden, "y": config.classes}, activation=config.activation)
        self.w1 = nn.Linear(config.inputs, config.hidden)
        self.w2 = nn.Linear(config.hidden, config.classes)
        init_linear_(self.w1.weight, self.w1.bias, generator)
        init_linear_(self.w2.weight, self.w2.bias, generator)
        noise = torch.randn(config.hidden, config.hidden, generator=generator) * config.lateral_scale
        self.lateral = nn.Parameter(0.5 * (noise + noise.t()))  # symmetric, as a Hopfield coupling

    def energy(self, x: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
        h, y = s["h"], s["y"]
        return (self.w1(x) * h).sum(1) + (self.w2(h) * y).sum(1) + 0.5 * ((h @ self.lateral) * h).sum(1)


@register_model("lateral", LateralConfig)
def build_lateral(config: LateralConfig, context: ModelContext) -> Lateral:
    return Lateral(config, context.generator)


if __name__ == "__main__":
    import argparse
    import tempfile

    from eqprop import validate_config
    from eqprop.training.trainer import train

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    config = validate_config({
        "name": "lateral", "plugins": [__file__],
        "model": {"kind": "lateral", "hidden": 32 if args.quick else 256},
        "data": {"dataset": "mnist-demo", "train_subset": 200 if args.quick else None},
        "dynamics": {"t1": 20, "t2": 6, "beta": 0.2}, "estimator": {"name": "symmetric"},
        "optim": {"lr": 0.05}, "train": {"epochs": 1 if args.quick else 5, "batch_size": 50},
    })
    with tempfile.TemporaryDirectory() as folder:
        train(config, folder)
