"""Where datasets live on disk when the caller does not say."""

from __future__ import annotations

import os
from pathlib import Path

from ..user_cache import user_cache_folder

DATA_ENV_VAR = "EQPROP_DATA"


def resolve_data_root(data_dir: str | os.PathLike[str] | None) -> Path:
    """Return the data root folder, the one that holds ``mnist/`` and ``cifar10/``.

    The first of these that is set wins: ``data_dir`` (e.g. from ``--data-dir``),
    the ``EQPROP_DATA`` environment variable, and the per-user cache folder
    ``$XDG_CACHE_HOME/eqprop/data`` (``~/.cache/eqprop/data`` when
    ``XDG_CACHE_HOME`` is unset or not absolute, as the XDG spec asks). Datasets
    are large and re-downloadable, so a cache folder is the natural default.
    The folder is not created here; only downloading creates it.
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_ENV_VAR)
    if from_env:
        return Path(from_env).expanduser()
    return user_cache_folder("data")
