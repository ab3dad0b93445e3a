"""Datasets for eqprop: MNIST, CIFAR-10 and a shipped MNIST subset, plus a device-side batch loader.

Datasets are read from their original file formats, verified against the
published checksums, and held in memory as ``uint8`` tensors
(:class:`ArrayDataset`); :class:`BatchLoader` turns them into normalised,
optionally augmented float batches on the training device.
"""

from eqprop.data.dataset import ArrayDataset
from eqprop.data.errors import DataError
from eqprop.data.loader import BatchLoader
from eqprop.data.paths import resolve_data_root
from eqprop.data.registry import DATASETS, load_dataset, register_dataset

__all__ = ["DATASETS", "ArrayDataset", "BatchLoader", "DataError", "load_dataset", "register_dataset", "resolve_data_root"]
