"""npz: a dataset of your own, as two NumPy archives ``train.npz`` and ``test.npz`` in one folder.

Each holds ``x``, the samples ``[N, ...]`` (``uint8`` images, scaled by 1/255 like
MNIST, or floating values used as they are; ``[N, H, W]`` is read as one
channel), and ``y``, integer class labels ``[N]`` in ``[0, classes)``; an
optional scalar ``classes`` gives the number of classes (default: the largest
label of both files plus one). Written, for example, with
``numpy.savez("train.npz", x=images, y=labels)``. Nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from eqprop.data.dataset import ArrayDataset
from eqprop.data.errors import DataError


def _arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise DataError(f"missing {path}: an npz dataset needs train.npz and test.npz in data.path") from None
    except (OSError, ValueError) as error:
        raise DataError(f"{path} is not a readable .npz archive ({error})") from None


def _labels_max(path: Path) -> int:
    labels = _arrays(path).get("y")
    return int(labels.max()) if labels is not None and labels.size and labels.dtype.kind in "iu" else -1


def load_npz(folder: Path | None, split: str) -> ArrayDataset:
    """Split ``split`` of the npz dataset in ``folder``, checked (one-line DataError otherwise)."""
    if folder is None or not folder.is_dir():
        raise DataError(f"data.path {folder} is not a folder (it should hold train.npz and test.npz)")
    path = folder / f"{split}.npz"
    arrays = _arrays(path)
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise DataError(f"{path} has no array {' or '.join(missing)} (it needs x and y)")
    x, y = arrays["x"], arrays["y"]
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{path}: y must be integer labels [N], got {y.dtype} of shape {list(y.shape)}")
    if x.ndim < 2 or x.shape[0] != y.shape[0]:
        raise DataError(f"{path}: x must be [N, ...] with one sample per label ({y.shape[0]}), got {list(x.shape)}")
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise DataError(f"{path}: x must be uint8 or floating, got {x.dtype}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{path}: x holds NaN or inf")
    if "classes" in arrays:
        classes = int(arrays["classes"])
    else:
        classes = 1 + max(_labels_max(folder / "train.npz"), _labels_max(folder / "test.npz"))
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise DataError(f"{path}: labels must lie in [0, {classes})")
    if classes < 2:
        raise DataError(f"{path}: a classification dataset needs at least two classes")
    if x.ndim == 3:
        x = x[:, None]  # [N, H, W]: one channel
    tensor = torch.from_numpy(np.ascontiguousarray(x if x.dtype == np.uint8 else x.astype(np.float32)))
    return ArrayDataset(tensor, torch.from_numpy(y.astype(np.int64)), classes, f"npz:{folder.name}")
