"""Alignment of forward and backward weights (Laborieux 2021 Fig. 5).

For every layer with a backward weight, the angle in degrees between W_{n+1}
and B_{n+1}^T, both flattened (conv: between w_{n+1} and B_{n+1}, the kernel
the transposed convolution uses). 0° means the prototypical model, 90° two
unrelated random matrices, 180° B = -W^T.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .models.base import EnergyModel
from .models.vf import VectorFieldModel


def angle_between(a: Tensor, b: Tensor) -> Tensor:
    """The angle in degrees between two tensors of the same number of entries, flattened (a 0-d tensor)."""
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    cos = torch.dot(a, b) / (a.norm() * b.norm())
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


def backward_angles(model: EnergyModel) -> dict[str, float]:
    """``{"layer<n>": angle}`` for every (W_n, B_n) pair, input first; empty for prototypical models.

    One host synchronisation for all layers.
    """
    if not isinstance(model, VectorFieldModel):
        return {}
    pairs = model.backward_pairs()
    if not pairs:
        return {}
    angles = torch.stack([angle_between(p.forward, p.mirror(p.backward)) for p in pairs]).tolist()
    return {f"layer{p.layer}": a for p, a in zip(pairs, angles)}

