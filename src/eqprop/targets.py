"""Targets as eqprop's heads use them: one-hot rows, from one-hot rows or integer class labels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def one_hot_targets(target: Tensor, classes: int, dtype: torch.dtype) -> Tensor:
    """``target`` as one-hot rows ``[B, classes]`` of ``dtype``: integer labels ``[B]`` are encoded
    (checked to lie in ``[0, classes)``), floating targets ``[B, classes]`` kept as they are (cast
    to ``dtype``). A one-line ValueError for anything else."""
    if target.is_floating_point():
        if target.dim() != 2 or target.shape[1] != classes:
            raise ValueError(f"targets: floating targets must be one-hot rows [B, {classes}], "
                             f"got shape {list(target.shape)}")
        return target.to(dtype)
    if target.dim() != 1:
        raise ValueError(f"targets: integer labels must have shape [B], got {list(target.shape)}")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= classes):
        raise ValueError(f"targets: labels must lie in [0, {classes}), got {int(target.min())}..{int(target.max())}")
    return F.one_hot(target.long(), classes).to(dtype)
