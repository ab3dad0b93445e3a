"""mnist-demo: a small MNIST subset shipped inside the package.

It lets examples, smoke runs and tests work offline on a fresh install: the
first 3,000 training and the first 1,000 test images of MNIST, stored as
``mnist_demo.npz`` next to this module (regenerate it with
``python -m eqprop.data.make_demo``).
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch

from eqprop.data.dataset import ArrayDataset
from eqprop.data.errors import DataError

DEMO_FILE = "mnist_demo.npz"
DEMO_SIZES = {"train": 3_000, "test": 1_000}


def demo_keys(split: str) -> tuple[str, str]:
    """Names of the images and labels arrays of ``split`` inside the npz file."""
    return f"{split}_images", f"{split}_labels"


def load_mnist_demo(split: str) -> ArrayDataset:
    """Load the ``"train"`` or ``"test"`` split of the shipped subset (no network, no data root)."""
    images_key, labels_key = demo_keys(split)
    resource = resources.files(__package__).joinpath(DEMO_FILE)
    try:
        with resource.open("rb") as stream, np.load(stream, allow_pickle=False) as arrays:
            images, labels = arrays[images_key], arrays[labels_key]
    except (OSError, KeyError, ValueError) as error:
        message = f"the mnist-demo data shipped with eqprop is unreadable ({error}): reinstall eqprop"
        raise DataError(message) from None
    _check(images, labels, split)
    return ArrayDataset(
        x=torch.from_numpy(images[:, None].copy()),
        y=torch.from_numpy(labels.astype(np.int64)),
        num_classes=10,
        name="mnist-demo",
    )


def _check(images: np.ndarray, labels: np.ndarray, split: str) -> None:
    """Make sure the arrays read from the npz file have the promised types, shapes and labels."""
    count = DEMO_SIZES[split]
    well_formed = (
        images.dtype == np.uint8
        and images.shape == (count, 28, 28)
        and labels.dtype == np.uint8
        and labels.shape == (count,)
        and labels.max() <= 9
    )
    if not well_formed:
        raise DataError(f"the mnist-demo data shipped with eqprop is damaged ({split} split): reinstall it")
