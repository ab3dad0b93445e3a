"""Datasets by name: how each is found, loaded and (where it can be) downloaded.

Three kinds of location: under the data root (``mnist``, ``cifar10``: one folder
each, downloadable), in a folder of the configuration's ``data.path`` (``npz``:
arrays of your own), or shipped with the package (``mnist-demo``). A plugin
registers more with :func:`register_dataset`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from eqprop.data.cifar10 import load_cifar10
from eqprop.data.dataset import ArrayDataset
from eqprop.data.demo import load_mnist_demo
from eqprop.data.download import download_cifar10, download_mnist
from eqprop.data.errors import DataError
from eqprop.data.mnist import load_mnist
from eqprop.data.npz import load_npz
from eqprop.data.paths import resolve_data_root
from eqprop.registration import same_definition

SPLITS: tuple[str, ...] = ("train", "test")
Location = Literal["root", "path", "package"]


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: ``load(folder, split)``, where ``folder`` is the data root
    (``location`` "root"), the configuration's ``data.path`` ("path") or None ("package");
    ``download(root)`` fetches missing files of a "root" dataset (None: it cannot)."""

    name: str
    load: Callable[[Path | None, str], ArrayDataset]
    location: Location = "root"
    download: Callable[[Path], None] | None = None

    @property
    def needs_path(self) -> bool:
        return self.location == "path"


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, load: Callable[[Path | None, str], ArrayDataset], *, location: Location = "root",
                     download: Callable[[Path], None] | None = None) -> DatasetEntry:
    """Make a dataset available by ``name`` to configurations (``data.dataset: NAME``).
    ``load(folder, split)`` returns the split as an :class:`ArrayDataset`, raising
    :class:`DataError` with a one-line message when its files are missing or wrong."""
    if name in DATASETS and not same_definition(DATASETS[name].load, load):
        raise ValueError(f"dataset {name!r} is already registered")
    DATASETS[name] = DatasetEntry(name, load, location, download)
    return DATASETS[name]


def dataset_entry(name: str) -> DatasetEntry:
    """The dataset registered as ``name``; a DataError lists the registered ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}") from None


register_dataset("mnist", load_mnist, download=download_mnist)
register_dataset("cifar10", load_cifar10, download=download_cifar10)
register_dataset("mnist-demo", lambda folder, split: load_mnist_demo(split), location="package")
register_dataset("npz", load_npz, location="path")


def load_dataset(name: str, split: str, root: Path | None = None, download: bool = False,
                 path: str | Path | None = None) -> ArrayDataset:
    """Load split ``split`` (``"train"`` or ``"test"``) of dataset ``name``, fully verified.

    ``root`` is the data root holding ``mnist/`` and ``cifar10/``; None means
    :func:`resolve_data_root`'s default. With ``download=True`` missing or
    invalid files are fetched first (files already valid are kept). ``path``:
    the folder of a dataset read from ``data.path`` (``npz``). ``"mnist-demo"``
    ships with the package, so ``root`` and ``download`` are ignored for it.
    Raises DataError with a one-line, actionable message.
    """
    entry = dataset_entry(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if entry.location == "package":
        return entry.load(None, split)
    if entry.location == "path":
        if path is None:
            raise DataError(f"dataset {name} reads its files from a folder: set data.path")
        return entry.load(Path(path).expanduser(), split)
    data_root = resolve_data_root(root)
    if download:
        if entry.download is None:
            raise DataError(f"dataset {name} cannot be downloaded: put its files under {data_root}")
        entry.download(data_root)
    return entry.load(data_root, split)
