"""load_dataset: one entry point that dispatches on the dataset name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from eqprop.data.cifar10 import load_cifar10
from eqprop.data.dataset import ArrayDataset
from eqprop.data.demo import load_mnist_demo
from eqprop.data.download import download_cifar10, download_mnist
from eqprop.data.errors import DataError
from eqprop.data.mnist import load_mnist
from eqprop.data.paths import resolve_data_root

DATASETS: tuple[str, ...] = ("mnist", "cifar10", "mnist-demo")
SPLITS: tuple[str, ...] = ("train", "test")

# name -> (loader, downloader) for the datasets that live under the data root
_ON_DISK: dict[str, tuple[Callable[[Path, str], ArrayDataset], Callable[[Path], None]]] = {
    "mnist": (load_mnist, download_mnist),
    "cifar10": (load_cifar10, download_cifar10),
}


def load_dataset(name: str, split: str, root: Path | None = None, download: bool = False) -> ArrayDataset:
    """Load split ``split`` (``"train"`` or ``"test"``) of dataset ``name``, fully verified.

    ``root`` is the data root holding ``mnist/`` and ``cifar10/``; None means
    :func:`resolve_data_root`'s default. With ``download=True`` missing or
    invalid files are fetched first (files already valid are kept).
    ``"mnist-demo"`` ships with the package, so ``root`` and ``download`` are
    ignored for it. Raises DataError with a one-line, actionable message.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if name == "mnist-demo":
        return load_mnist_demo(split)
    load, fetch = _ON_DISK[name]
    data_root = resolve_data_root(root)
    if download:
        fetch(data_root)
    return load(data_root, split)
