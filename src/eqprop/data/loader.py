"""BatchLoader: mini-batches built on the training device from a whole in-memory dataset.

The ``uint8`` dataset is copied to the device once; every batch is then cut
out, converted, normalised and augmented with whole-batch tensor operations,
with no per-sample Python work and no worker processes. For datasets the
size of MNIST or CIFAR-10 this keeps the input pipeline far cheaper than the
model.

Randomness: all the random numbers of an epoch (the shuffle permutation, then
one crop offset pair and one flip flag per example, in that order) are drawn
on the CPU from ``generator`` when the epoch's first batch is requested, then
moved to the device. The generator's state therefore advances by the same
amount every epoch, whether or not the epoch is iterated to the end, and
saving ``generator.get_state()`` between epochs and restoring it later
reproduces all following batches exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from eqprop.data.dataset import ArrayDataset
from eqprop.distributed import WORLD, World


class BatchLoader:
    """Iterate over an :class:`ArrayDataset` in batches of float images and int64 labels on ``device``.

    Args:
        data: the dataset split; its tensors are copied to ``device`` once, here.
        batch_size: examples per batch (the last batch may be smaller unless ``drop_last``).
        shuffle: visit the examples in a fresh random order every epoch.
        device: where batches are built and returned.
        generator: CPU generator for the shuffle order and the augmentation
            draws; None uses PyTorch's global CPU generator.
        mean: per-channel mean subtracted after scaling pixels to [0, 1]:
            ``(x / 255 - mean) / std`` (None, with std None: plain ``x / 255``).
        std: per-channel standard deviation divided by (given with ``mean``).
        augment: random crop from the edge-replicated image padded by
            ``crop_padding`` pixels on each side, then random horizontal flip.
        crop_padding: padding for the random crop (0: flips only).
        flatten: return images as ``[B, C*H*W]`` for fully connected models
            instead of ``[B, C, H, W]``.
        dtype: floating dtype of the returned images.
        drop_last: skip the final batch if it is smaller than ``batch_size``.
        world: the run's processes (:mod:`eqprop.distributed`): each yields its share of every
            batch of ``batch_size`` (the global batch), the order and augmentation drawn for
            the whole dataset on every rank alike, so they do not depend on the world size.
    """

    def __init__(
        self,
        data: ArrayDataset,
        batch_size: int,
        *,
        shuffle: bool,
        device: torch.device,
        generator: torch.Generator | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: bool = False,
        crop_padding: int = 4,
        flatten: bool = False,
        dtype: torch.dtype = torch.float32,
        drop_last: bool = False,
        world: World = WORLD,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be non-negative, got {crop_padding}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, got {dtype}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU generator, got one on {generator.device}")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.device = torch.device(device)
        self.generator = generator
        self.augment = augment
        self.crop_padding = crop_padding
        self.flatten = flatten
        self.dtype = dtype
        self.drop_last = drop_last
        self.world = world
        self._x = data.x.to(self.device)
        self._y = data.y.to(self.device)
        if augment and data.x.dim() != 4:
            raise ValueError(f"augment: crops and flips images [N, C, H, W]; these samples are {list(data.x.shape)}")
        self._normalisation = _normalisation(mean, std, data.x.shape[1], data.x.dim(), dtype, self.device)

    @property
    def labels(self) -> torch.Tensor:
        """Every example's label (on the device)."""
        return self._y

    @property
    def num_examples(self) -> int:
        """Number of examples in the dataset (including any dropped by ``drop_last``)."""
        return self._y.shape[0]

    def global_size(self, batch: int) -> int:
        """The number of samples of batch ``batch`` (from 1) over all ranks."""
        return min(self.batch_size, self.num_examples - (batch - 1) * self.batch_size)

    def __len__(self) -> int:
        """Number of batches per epoch."""
        if self.drop_last:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield one epoch of ``(x, y)``: x of ``dtype`` on the device, y int64 on the device."""
        for x, y, _ in self.with_indices():
            yield x, y

    def with_indices(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield one epoch of ``(x, y, indices)``: as iterating does, with each sample's index in
        the dataset (on the device), for what is kept per sample (a warm start's states)."""
        order = self._draw_order()
        crops = self._draw_augmentation() if self.augment else None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            count = min(self.batch_size, self.num_examples - start)
            share = self.world.share(count)
            positions = slice(start + share.start, start + share.stop)  # this rank's share of the batch
            indices = order[positions]
            x = self._x.index_select(0, indices).to(self.dtype)
            if self._x.dtype == torch.uint8:
                x.div_(255)
            if self._normalisation is not None:
                mean, std = self._normalisation
                x.sub_(mean).div_(std)
            if crops is not None:
                offsets, flips = crops
                x = crop_and_flip(x, offsets[positions], flips[positions], self.crop_padding)
            if self.flatten:
                x = x.flatten(1)
            yield x, self._y.index_select(0, indices), indices

    def _draw_order(self) -> torch.Tensor:
        """The epoch's visiting order: a permutation from the generator, or the identity."""
        if self.shuffle:
            order = torch.randperm(self.num_examples, generator=self.generator)
            return order.to(self.device, non_blocking=True)
        return torch.arange(self.num_examples, device=self.device)

    def _draw_augmentation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop offsets ``[N, 2]`` (row, column) and flip flags ``[N]`` for every position in the epoch."""
        n = self.num_examples
        offsets = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=self.generator)
        flips = torch.randint(0, 2, (n,), generator=self.generator).bool()
        return offsets.to(self.device, non_blocking=True), flips.to(self.device, non_blocking=True)


def _normalisation(
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    channels: int,
    dims: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel mean and std shaped to broadcast over samples of ``dims`` dimensions (batch
    included; ``[1, C, 1, 1]`` for images), or None when both are None. The channel is the
    samples' first dimension (a feature, for ``[N, D]`` samples)."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ValueError("mean and std must be given together")
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need {channels} values, one per channel; got {len(mean)} and {len(std)}"
        )
    if min(std) <= 0:
        raise ValueError(f"std values must be positive, got {list(std)}")
    shape = (1, channels) + (1,) * (dims - 2)
    return (
        torch.tensor(mean, dtype=dtype, device=device).reshape(shape),
        torch.tensor(std, dtype=dtype, device=device).reshape(shape),
    )


def crop_and_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Cut an ``H x W`` window out of each edge-padded image, mirrored where flagged.

    Args:
        x: images ``[B, C, H, W]`` (floating point).
        offsets: ``[B, 2]`` top-left corner (row, column) of each window in the
            padded image, each in ``[0, 2 * padding]``.
        flips: ``[B]`` bool, True to mirror that image left-right.
        padding: pixels of edge replication added on every side before cropping.

    One gather does both: a flipped window reads its columns right to left.
    """
    batch, channels, height, width = x.shape
    padded = F.pad(x, (padding,) * 4, mode="replicate") if padding else x
    row_steps = torch.arange(height, device=x.device)
    col_steps = torch.arange(width, device=x.device)
    rows = offsets[:, 0:1] + row_steps  # [B, H]
    cols = offsets[:, 1:2] + torch.where(flips[:, None], col_steps.flip(0), col_steps)  # [B, W]
    batch_index = torch.arange(batch, device=x.device).view(batch, 1, 1, 1)
    channel_index = torch.arange(channels, device=x.device).view(1, channels, 1, 1)
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]
