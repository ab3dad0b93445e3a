"""CIFAR-10 reading and verification against the real files in the shared data folder."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from eqprop.data import ArrayDataset, DataError, load_dataset
from eqprop.data.cifar10 import CIFAR10_SHA1, FILE_BYTES, RECORD_BYTES, decode_cifar10_batch

TRAIN_MEAN = (0.4914, 0.4822, 0.4465)
TRAIN_STD = (0.2470, 0.2435, 0.2616)


@pytest.fixture(scope="module")
def cifar_train(data_root: Path) -> ArrayDataset:
    return load_dataset("cifar10", "train", data_root)


@pytest.fixture(scope="module")
def cifar_test(data_root: Path) -> ArrayDataset:
    return load_dataset("cifar10", "test", data_root)


@pytest.fixture(scope="module")
def test_batch_content(data_root: Path) -> bytes:
    """Decompressed bytes of the real test_batch.bin."""
    return gzip.decompress((data_root / "cifar10" / "test_batch.bin.gz").read_bytes())


def pixel_mean_std(pixels: torch.Tensor) -> tuple[float, float]:
    """Exact mean and (population) std of uint8 pixels on the [0, 1] scale, via a histogram."""
    counts = torch.bincount(pixels.flatten(), minlength=256).to(torch.float64)
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = counts @ values / counts.sum()
    variance = counts @ (values - mean) ** 2 / counts.sum()
    return mean.item(), variance.sqrt().item()


def test_shapes_and_dtypes(cifar_train: ArrayDataset, cifar_test: ArrayDataset) -> None:
    assert cifar_train.x.shape == (50_000, 3, 32, 32)
    assert cifar_test.x.shape == (10_000, 3, 32, 32)
    for data in (cifar_train, cifar_test):
        assert data.x.dtype == torch.uint8 and data.x.is_contiguous()
        assert data.y.dtype == torch.int64
        assert data.num_classes == 10 and data.name == "cifar10"


def test_classes_are_balanced(cifar_train: ArrayDataset, cifar_test: ArrayDataset) -> None:
    assert cifar_train.y.bincount(minlength=10).tolist() == [5000] * 10
    assert cifar_test.y.bincount(minlength=10).tolist() == [1000] * 10


def test_training_channel_statistics(cifar_train: ArrayDataset) -> None:
    for channel in range(3):
        mean, std = pixel_mean_std(cifar_train.x[:, channel])
        assert mean == pytest.approx(TRAIN_MEAN[channel], abs=1e-3), f"channel {channel}"
        assert std == pytest.approx(TRAIN_STD[channel], abs=1e-3), f"channel {channel}"


def test_first_test_record_matches_raw_bytes(cifar_test: ArrayDataset, test_batch_content: bytes) -> None:
    record = np.frombuffer(test_batch_content[:RECORD_BYTES], np.uint8)
    assert cifar_test.y[0].item() == record[0] == 3  # the first test image is a cat
    assert cifar_test.x[0].flatten().numpy().tobytes() == record[1:].tobytes()


def test_records_are_red_green_blue_planes(monkeypatch: pytest.MonkeyPatch) -> None:
    records = np.zeros((10_000, RECORD_BYTES), np.uint8)
    records[:, 0] = np.arange(10_000) % 10
    records[:, 1:] = np.arange(3072) % 251  # a prime, so no two nearby pixels share a value
    content = records.tobytes()
    monkeypatch.setitem(CIFAR10_SHA1, "test_batch.bin", hashlib.sha1(content).hexdigest())
    images, labels = decode_cifar10_batch(content, "test_batch.bin")
    channel, row, column = 2, 5, 7
    assert images[3, channel, row, column] == (channel * 1024 + row * 32 + column) % 251
    assert labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def write_test_batch(tmp_path: Path, content: bytes, name: str = "test_batch.bin") -> Path:
    folder = tmp_path / "cifar10"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes(content)
    return path


def flipped(at: int) -> Callable[[bytes], bytes]:
    return lambda content: content[:at] + bytes([content[at] ^ 0xFF]) + content[at + 1 :]


def relabelled(at: int, label: int) -> Callable[[bytes], bytes]:
    return lambda content: content[:at] + bytes([label]) + content[at + 1 :]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda content: content[:-1], f"is truncated ({FILE_BYTES - 1} bytes, expected {FILE_BYTES})"),
        (lambda content: content + b"\0", f"has {FILE_BYTES + 1} bytes (expected {FILE_BYTES})"),
        (flipped(RECORD_BYTES * 123 + 456), "is corrupt (sha1 mismatch): replace it with a good copy, or delete it and, with internet access, run with --download"),
        (relabelled(RECORD_BYTES * 7, 10), "has labels outside 0-9"),
    ],
    ids=["truncated", "too-long", "flipped-byte", "bad-label"],
)
def test_damaged_file_is_reported(
    tmp_path: Path, test_batch_content: bytes, edit: Callable[[bytes], bytes], expected: str
) -> None:
    path = write_test_batch(tmp_path, edit(test_batch_content))
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10", "test", tmp_path)
    message = str(caught.value)
    assert message.startswith(f"CIFAR-10 file {path} ")
    assert expected in message


def test_truncated_gzip_is_reported(tmp_path: Path, data_root: Path) -> None:
    compressed = (data_root / "cifar10" / "test_batch.bin.gz").read_bytes()
    path = write_test_batch(tmp_path, compressed[:-1000], "test_batch.bin.gz")
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10", "test", tmp_path)
    assert str(caught.value) == (
        f"CIFAR-10 file {path} is not a valid gzip file (truncated or damaged): "
        "replace it with a good copy, or delete it and, with internet access, run with --download"
    )


def test_plain_copy_loads_like_the_gzip_file(
    tmp_path: Path, test_batch_content: bytes, cifar_test: ArrayDataset
) -> None:
    write_test_batch(tmp_path, test_batch_content)
    data = load_dataset("cifar10", "test", tmp_path)
    assert data.x.equal(cifar_test.x) and data.y.equal(cifar_test.y)


def test_missing_training_batch_is_reported(tmp_path: Path, test_batch_content: bytes) -> None:
    write_test_batch(tmp_path, test_batch_content)
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10", "train", tmp_path)
    assert str(caught.value) == (
        f"CIFAR-10 file {tmp_path / 'cifar10' / 'data_batch_1.bin'}[.gz] is missing: "
        f"put the CIFAR-10 files in {tmp_path / 'cifar10'} (see the README's Data section), point --data-dir at "
        "a data root holding cifar10/, or, with internet access, run with --download"
    )
