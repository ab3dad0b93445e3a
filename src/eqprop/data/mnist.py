"""MNIST in its original IDX format: parse and verify the four files."""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eqprop.data.dataset import ArrayDataset
from eqprop.data.files import ContentError, read_dataset_file

MNIST_DIR = "mnist"
IMAGE_SIDE = 28
_IMAGES_MAGIC = 0x00000803  # IDX: unsigned bytes, 3 dimensions
_LABELS_MAGIC = 0x00000801  # IDX: unsigned bytes, 1 dimension


@dataclass(frozen=True)
class MnistFile:
    """What one MNIST file must contain."""

    md5: str  # of the decompressed content, as published with MNIST
    count: int  # number of images or labels
    holds_images: bool


MNIST_FILES: dict[str, MnistFile] = {
    "train-images-idx3-ubyte": MnistFile("6bbc9ace898e44ae57da46a324031adb", 60_000, True),
    "train-labels-idx1-ubyte": MnistFile("a25bea736e30d166cdddb491f175f624", 60_000, False),
    "t10k-images-idx3-ubyte": MnistFile("2646ac647ad5339dbf082846283269ea", 10_000, True),
    "t10k-labels-idx1-ubyte": MnistFile("27ae3e4e09519cfbb04c329615203637", 10_000, False),
}

# split -> (images file, labels file)
MNIST_SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def decode_mnist(content: bytes, name: str) -> np.ndarray:
    """Parse the decompressed content of MNIST file ``name`` and verify it.

    Checks the IDX magic number, the dimensions, the label range and the md5
    of the content; raises ContentError on the first problem. Returns a
    read-only ``uint8`` view: ``[count, 28, 28]`` for images, ``[count]`` for labels.
    """
    spec = MNIST_FILES[name]
    if spec.holds_images:
        array = _parse_idx(content, _IMAGES_MAGIC, (spec.count, IMAGE_SIDE, IMAGE_SIDE))
    else:
        array = _parse_idx(content, _LABELS_MAGIC, (spec.count,))
        if array.max() > 9:
            raise ContentError("has labels outside 0-9")
    if hashlib.md5(content).hexdigest() != spec.md5:
        raise ContentError("is corrupt (md5 mismatch)")
    return array


def _parse_idx(content: bytes, magic: int, shape: tuple[int, ...]) -> np.ndarray:
    """Check an IDX header (big-endian magic and dimensions) and view the payload as ``shape``."""
    header_bytes = 4 * (1 + len(shape))
    if len(content) < header_bytes:
        raise ContentError(f"is truncated ({len(content)} bytes, shorter than its IDX header)")
    found_magic, *dims = struct.unpack(f">{1 + len(shape)}I", content[:header_bytes])
    if found_magic != magic:
        raise ContentError(f"has bad magic number {found_magic:#010x} (expected {magic:#010x})")
    if tuple(dims) != shape:
        raise ContentError(f"has dimensions {_dims(dims)} (expected {_dims(shape)})")
    expected_bytes = header_bytes + math.prod(shape)
    if len(content) < expected_bytes:
        raise ContentError(f"is truncated ({len(content)} bytes, expected {expected_bytes})")
    if len(content) > expected_bytes:
        raise ContentError(f"has {len(content)} bytes (expected {expected_bytes})")
    return np.frombuffer(content, np.uint8, offset=header_bytes).reshape(shape)


def _dims(shape: tuple[int, ...] | list[int]) -> str:
    return "x".join(str(size) for size in shape)


def read_mnist_file(folder: Path, name: str) -> np.ndarray:
    """Read and verify MNIST file ``name`` (plain or ``.gz``) from ``folder``; DataError on any problem."""
    return read_dataset_file(folder, name, "MNIST", decode_mnist)


def load_mnist(root: Path, split: str) -> ArrayDataset:
    """Load the ``"train"`` or ``"test"`` split from ``root/mnist/``, verified; nothing is cached."""
    images_name, labels_name = MNIST_SPLITS[split]
    folder = root / MNIST_DIR
    images = read_mnist_file(folder, images_name)
    labels = read_mnist_file(folder, labels_name)
    return ArrayDataset(
        x=torch.from_numpy(images[:, None].copy()),
        y=torch.from_numpy(labels.astype(np.int64)),
        num_classes=10,
        name="mnist",
    )
