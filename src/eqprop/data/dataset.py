"""The in-memory form every dataset is loaded into."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A whole dataset split held as two tensors.

    Images stay ``uint8`` so a split costs one byte per pixel wherever it is
    kept; :class:`~eqprop.data.loader.BatchLoader` converts batch by batch
    (``uint8`` scaled by 1/255, floating samples used as they are).

    Attributes:
        x: ``uint8`` images ``[N, C, H, W]`` (MNIST ``[N, 1, 28, 28]``,
            CIFAR-10 ``[N, 3, 32, 32]``), or any ``uint8`` or ``float32``
            samples ``[N, ...]`` (e.g. feature vectors ``[N, D]``).
        y: ``int64`` class labels in ``[0, num_classes)``, shape ``[N]``.
        num_classes: number of classes.
        name: dataset name (``"mnist"``, ``"cifar10"``, ``"mnist-demo"``).
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        """Reject tensors of the wrong kind early, where the cause is obvious."""
        if self.x.dtype not in (torch.uint8, torch.float32) or self.x.dim() < 2:
            raise ValueError(f"x must be uint8 or float32 [N, ...], got {self.x.dtype} {list(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.dim() != 1:
            raise ValueError(f"y must be int64 [N], got {self.y.dtype} {list(self.y.shape)}")
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x has {self.x.shape[0]} images but y has {self.y.shape[0]} labels")

    def __len__(self) -> int:
        """Number of examples."""
        return self.y.shape[0]
