"""CIFAR-10 in its binary format: parse and verify the six batch files.

Each file holds 10,000 records of one label byte followed by 3,072 pixel
bytes (the red, green and blue 32x32 planes). This is the format of the
official ``cifar-10-binary.tar.gz``; the pickled "python version" is never read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from eqprop.data.dataset import ArrayDataset
from eqprop.data.files import ContentError, read_dataset_file

CIFAR10_DIR = "cifar10"
IMAGE_SHAPE = (3, 32, 32)
RECORD_BYTES = 1 + 3 * 32 * 32
RECORDS_PER_FILE = 10_000
FILE_BYTES = RECORDS_PER_FILE * RECORD_BYTES  # 30,730,000

# sha1 of each file's decompressed content, as published in the official archive
CIFAR10_SHA1: dict[str, str] = {
    "data_batch_1.bin": "aadd24acce27caa71bf4b10992e9e7b2d74c2540",
    "data_batch_2.bin": "c0ba65cce70568cd57b4e03e9ac8d2a5367c1795",
    "data_batch_3.bin": "1dd00a74ab1d17a6e7d73e185b69dbf31242f295",
    "data_batch_4.bin": "aab85764eb3584312d3c7f65fd2fd016e36a258e",
    "data_batch_5.bin": "26e2849e66a845b7f1e4614ae70f4889ae604628",
    "test_batch.bin": "67eb016db431130d61cd03c7ad570b013799c88c",
}

CIFAR10_SPLITS: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{index}.bin" for index in range(1, 6)),
    "test": ("test_batch.bin",),
}


def decode_cifar10_batch(content: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse the decompressed content of batch file ``name`` and verify it.

    Checks the exact size, the label range and the sha1 of the content; raises
    ContentError on the first problem. Returns read-only ``uint8`` views:
    images ``[10000, 3, 32, 32]`` and labels ``[10000]``.
    """
    if len(content) < FILE_BYTES:
        raise ContentError(f"is truncated ({len(content)} bytes, expected {FILE_BYTES})")
    if len(content) > FILE_BYTES:
        raise ContentError(f"has {len(content)} bytes (expected {FILE_BYTES})")
    records = np.frombuffer(content, np.uint8).reshape(RECORDS_PER_FILE, RECORD_BYTES)
    labels = records[:, 0]
    if labels.max() > 9:
        raise ContentError("has labels outside 0-9")
    if hashlib.sha1(content).hexdigest() != CIFAR10_SHA1[name]:
        raise ContentError("is corrupt (sha1 mismatch)")
    return records[:, 1:].reshape(RECORDS_PER_FILE, *IMAGE_SHAPE), labels


def read_cifar10_file(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and verify batch file ``name`` (plain or ``.gz``) from ``folder``; DataError on any problem."""
    return read_dataset_file(folder, name, "CIFAR-10", decode_cifar10_batch)


def load_cifar10(root: Path, split: str) -> ArrayDataset:
    """Load the ``"train"`` (5 files) or ``"test"`` split from ``root/cifar10/``, verified.

    Nothing is cached: the files are read and checked on every call.
    """
    folder = root / CIFAR10_DIR
    batches = [read_cifar10_file(folder, name) for name in CIFAR10_SPLITS[split]]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return ArrayDataset(
        x=torch.from_numpy(images),
        y=torch.from_numpy(labels.astype(np.int64)),
        num_classes=10,
        name="cifar10",
    )
