"""A residual convolutional Hopfield network as one plug-in file: relu6 units, skip couplings,
centered (symmetric ±β) EP.

    Φ(x, s) = h1·conv_in(x) + Σ_i h_{i+1}·conv_i(h_i) + α Σ_i h_{i+2}·h_i + z·fc(h_last) + readout

Every term is bilinear in two neighbouring states, so Φ is a Hopfield energy: each coupling acts
both ways, and a skip coupling α h_{i+2}·h_i is the energy form of a residual connection (h_i
feeds h_{i+2} and h_{i+2} feeds back into h_i). relu6 bounds every unit in [0, 6]. Registered as
model kind ``hopfield_resnet``, it trains, resumes, evaluates and runs the GDU check from the
command line like a built-in model (``examples/hopfield_resnet.yaml``):

    eqprop train --config examples/hopfield_resnet.yaml --data-dir DATA
    eqprop gdu --config examples/hopfield_resnet.yaml --batch-size 8 --data-dir DATA

Run as a script, it trains on the shipped mnist-demo subset (``--quick``: a few batches).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import PositiveInt
from torch import nn

from eqprop import ModelContext, ModelSection, PhiModel, register_model
from eqprop.activations import ACTIVATIONS, register_activation

if "relu6" not in ACTIVATIONS:
    register_activation("relu6", lambda u: u.clamp(0.0, 6.0), description="min(max(u, 0), 6)")


class HopfieldResNetConfig(ModelSection):
    """The ``model`` section of kind ``hopfield_resnet``."""

    kind: Literal["hopfield_resnet"] = "hopfield_resnet"
    in_channels: PositiveInt = 1
    image_size: PositiveInt = 28
    channels: PositiveInt = 16
    blocks: PositiveInt = 3          # convolutional state layers after the first
    features: PositiveInt = 64       # the fully connected layer read out
    classes: PositiveInt = 10
    skip: float = 0.25               # α, the strength of the skip couplings
    weight_scale: float = 0.5        # the initial weights' scale against PyTorch's default


class HopfieldResNet(PhiModel):
    def __init__(self, config: HopfieldResNetConfig, generator: torch.Generator | None = None) -> None:
        side = config.image_size // 2
        layers = {f"h{i}": (config.channels, side, side) for i in range(config.blocks + 1)}
        super().__init__(layers | {"z": config.features}, activation="relu6", loss="ce", classes=config.classes)
        self.skip = config.skip
        self.conv_in = nn.Conv2d(config.in_channels, config.channels, 4, stride=2, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(config.channels, config.channels, 3, padding=1)
                                   for _ in range(config.blocks))
        self.fc = nn.Linear(config.channels * side * side, config.features)
        with torch.no_grad():  # PyTorch's default initialisation, drawn from the run's generator and scaled
            for layer in (self.conv_in, *self.convs, self.fc):
                bound = config.weight_scale / layer.weight[0].numel() ** 0.5
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)

    def energy(self, x: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
        h = [s[f"h{i}"] for i in range(len(self.convs) + 1)]
        phi = (h[0] * self.conv_in(x)).flatten(1).sum(1)
        for i, conv in enumerate(self.convs):
            phi = phi + (h[i + 1] * conv(h[i])).flatten(1).sum(1)
        for i in range(len(h) - 2):
            phi = phi + self.skip * (h[i + 2] * h[i]).flatten(1).sum(1)
        return phi + (s["z"] * self.fc(h[-1].flatten(1))).sum(1)


@register_model("hopfield_resnet", HopfieldResNetConfig, flat_input=False)
def build_hopfield_resnet(config: HopfieldResNetConfig, context: ModelContext) -> HopfieldResNet:
    return HopfieldResNet(config, context.generator)


if __name__ == "__main__":
    import argparse
    import tempfile

    from eqprop import validate_config
    from eqprop.training.trainer import train

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    config = validate_config({
        "name": "hopfield-resnet", "plugins": [__file__],
        "model": {"kind": "hopfield_resnet", "channels": 4 if args.quick else 16, "blocks": 2 if args.quick else 3},
        "data": {"dataset": "mnist-demo", "train_subset": 200 if args.quick else None},
        "dynamics": {"t1": 20, "t2": 8, "beta": 0.5}, "estimator": {"name": "symmetric"},
        "optim": {"name": "sgd", "lr": 0.02, "momentum": 0.9},
        "train": {"epochs": 1 if args.quick else 5, "batch_size": 50},
    })
    with tempfile.TemporaryDirectory() as folder:
        train(config, folder)
