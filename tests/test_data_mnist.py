"""MNIST reading and verification against the real files in the shared data folder."""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from eqprop.data import ArrayDataset, DataError, load_dataset
from eqprop.data.demo import DEMO_FILE
from eqprop.data.make_demo import build_demo

TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist_train(data_root: Path) -> ArrayDataset:
    return load_dataset("mnist", "train", data_root)


@pytest.fixture(scope="module")
def mnist_test(data_root: Path) -> ArrayDataset:
    return load_dataset("mnist", "test", data_root)


def pixel_mean_std(pixels: torch.Tensor) -> tuple[float, float]:
    """Exact mean and (population) std of uint8 pixels on the [0, 1] scale, via a histogram."""
    counts = torch.bincount(pixels.flatten(), minlength=256).to(torch.float64)
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = counts @ values / counts.sum()
    variance = counts @ (values - mean) ** 2 / counts.sum()
    return mean.item(), variance.sqrt().item()


def test_shapes_and_dtypes(mnist_train: ArrayDataset, mnist_test: ArrayDataset) -> None:
    assert mnist_train.x.shape == (60_000, 1, 28, 28)
    assert mnist_test.x.shape == (10_000, 1, 28, 28)
    for data in (mnist_train, mnist_test):
        assert data.x.dtype == torch.uint8
        assert data.y.dtype == torch.int64
        assert data.x.is_contiguous()
        assert data.num_classes == 10
        assert data.name == "mnist"
        assert len(data) == data.y.shape[0]


def test_label_counts(mnist_train: ArrayDataset, mnist_test: ArrayDataset) -> None:
    train_counts = mnist_train.y.bincount(minlength=10).tolist()
    test_counts = mnist_test.y.bincount(minlength=10).tolist()
    assert sum(train_counts) == 60_000 and sum(test_counts) == 10_000
    assert train_counts == TRAIN_CLASS_COUNTS
    assert test_counts == TEST_CLASS_COUNTS


def test_training_pixel_statistics(mnist_train: ArrayDataset) -> None:
    mean, std = pixel_mean_std(mnist_train.x)
    assert mean == pytest.approx(0.1307, abs=1e-3)
    assert std == pytest.approx(0.3081, abs=1e-3)


def test_plain_files_read_like_gzip_files(
    tmp_path: Path, data_root: Path, mnist_test: ArrayDataset
) -> None:
    folder = plain_test_copy(tmp_path, data_root)
    assert not list(folder.glob("*.gz"))
    data = load_dataset("mnist", "test", tmp_path)
    assert data.x.equal(mnist_test.x) and data.y.equal(mnist_test.y)


def plain_test_copy(tmp_path: Path, data_root: Path) -> Path:
    """Decompressed copies of the two MNIST test files in tmp_path/mnist; returns that folder."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (folder / name).write_bytes(gzip.decompress((data_root / "mnist" / f"{name}.gz").read_bytes()))
    return folder


def edit_bytes(path: Path, edit: Callable[[bytearray], bytearray]) -> None:
    path.write_bytes(bytes(edit(bytearray(path.read_bytes()))))


def flip_byte(at: int) -> Callable[[bytearray], bytearray]:
    def edit(content: bytearray) -> bytearray:
        content[at] ^= 0xFF
        return content

    return edit


def set_byte(at: int, value: int) -> Callable[[bytearray], bytearray]:
    def edit(content: bytearray) -> bytearray:
        content[at] = value
        return content

    return edit


@pytest.mark.parametrize(
    ("file", "edit", "expected"),
    [
        ("t10k-images-idx3-ubyte", flip_byte(16 + 400), "is corrupt (md5 mismatch): replace it with a good copy, or delete it and"),
        ("t10k-labels-idx1-ubyte", set_byte(3, 0x03), "bad magic number 0x00000803 (expected 0x00000801)"),
        ("t10k-images-idx3-ubyte", set_byte(7, 0x0F), "dimensions 9999x28x28 (expected 10000x28x28)"),
        ("t10k-images-idx3-ubyte", lambda content: content[:-100], "is truncated"),
        ("t10k-labels-idx1-ubyte", lambda content: content + b"\0", "10009 bytes (expected 10008)"),
        ("t10k-labels-idx1-ubyte", set_byte(8 + 17, 10), "labels outside 0-9"),
        ("t10k-labels-idx1-ubyte", lambda content: content[:5], "shorter than its IDX header"),
    ],
    ids=["flipped-byte", "bad-magic", "wrong-count", "truncated", "too-long", "bad-label", "no-header"],
)
def test_damaged_file_is_reported(
    tmp_path: Path, data_root: Path, file: str, edit: Callable[[bytearray], bytearray], expected: str
) -> None:
    folder = plain_test_copy(tmp_path, data_root)
    edit_bytes(folder / file, edit)
    with pytest.raises(DataError, match="MNIST file") as caught:
        load_dataset("mnist", "test", tmp_path)
    message = str(caught.value)
    assert str(folder / file) in message
    assert expected in message
    assert "\n" not in message


def test_truncated_gzip_is_reported(tmp_path: Path, data_root: Path) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    shutil.copy(data_root / "mnist" / "t10k-labels-idx1-ubyte.gz", folder)
    images = (data_root / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(images[: len(images) // 2])
    with pytest.raises(DataError) as caught:
        load_dataset("mnist", "test", tmp_path)
    assert str(caught.value) == (
        f"MNIST file {folder / 't10k-images-idx3-ubyte.gz'} is not a valid gzip file (truncated or damaged): "
        "replace it with a good copy, or delete it and, with internet access, run with --download"
    )


def test_missing_file_is_reported(tmp_path: Path, data_root: Path) -> None:
    folder = plain_test_copy(tmp_path, data_root)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as caught:
        load_dataset("mnist", "test", tmp_path)
    assert str(caught.value) == (
        f"MNIST file {folder / 't10k-labels-idx1-ubyte'}[.gz] is missing: "
        f"put the MNIST files in {folder} (see the README's Data section), point --data-dir at a data root "
        "holding mnist/, or, with internet access, run with --download"
    )


@pytest.mark.parametrize("file_at", ["", "mnist"])
def test_a_data_root_or_dataset_folder_that_is_a_file_is_named(tmp_path: Path, file_at: str) -> None:
    (tmp_path / "root").mkdir()
    blocking = tmp_path / "root" / file_at if file_at else tmp_path / "root"
    if not file_at:
        blocking.rmdir()
    blocking.write_text("not a folder")
    with pytest.raises(DataError) as caught:
        load_dataset("mnist", "test", tmp_path / "root")
    assert str(caught.value) == (
        f"MNIST folder {tmp_path / 'root' / 'mnist'} cannot exist: {blocking} is a file, not a folder; point "
        "--data-dir (or $EQPROP_DATA) at a data root, a folder that holds one folder per dataset")


def test_plain_file_is_preferred_over_gzip(tmp_path: Path, data_root: Path) -> None:
    folder = plain_test_copy(tmp_path, data_root)
    shutil.copy(data_root / "mnist" / "t10k-labels-idx1-ubyte.gz", folder)
    labels = folder / "t10k-labels-idx1-ubyte"
    edit_bytes(labels, set_byte(100, (labels.read_bytes()[100] + 1) % 10))
    with pytest.raises(DataError) as caught:
        load_dataset("mnist", "test", tmp_path)
    assert f"{labels} is corrupt (md5 mismatch)" in str(caught.value)


def test_demo_is_the_head_of_real_mnist(mnist_train: ArrayDataset, mnist_test: ArrayDataset) -> None:
    for split, full, count in (("train", mnist_train, 3000), ("test", mnist_test, 1000)):
        demo = load_dataset("mnist-demo", split, None)
        assert demo.name == "mnist-demo" and demo.num_classes == 10
        assert demo.x.shape == (count, 1, 28, 28) and demo.x.dtype == torch.uint8
        assert demo.y.dtype == full.y.dtype
        assert demo.x.equal(full.x[:count])
        assert demo.y.equal(full.y[:count])
        assert set(demo.y.tolist()) == set(range(10))


def test_shipped_demo_file_is_small_and_reproducible(tmp_path: Path, data_root: Path) -> None:
    shipped = Path(__file__).resolve().parents[1] / "src" / "eqprop" / "data" / DEMO_FILE
    assert shipped.stat().st_size < 1_500_000
    rebuilt = tmp_path / "demo.npz"
    build_demo(data_root, rebuilt)
    with np.load(shipped, allow_pickle=False) as old, np.load(rebuilt, allow_pickle=False) as new:
        assert sorted(old.files) == sorted(new.files)
        for key in old.files:
            assert old[key].dtype == np.uint8
            np.testing.assert_array_equal(old[key], new[key])
