"""Seeded parameter initialisation shared by all layers."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def init_linear_(weight: Tensor, bias: Tensor | None, generator: torch.Generator | None,
                 scale: float = 1.0) -> None:
    """PyTorch's default init for Linear/Conv weights (kaiming-uniform, a=√5) and biases,
    drawn from ``generator`` so that a seed fixes the network, times ``scale``."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        weight.mul_(scale)
        if bias is not None:
            fan_in = weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            bias.uniform_(-bound, bound, generator=generator).mul_(scale)
