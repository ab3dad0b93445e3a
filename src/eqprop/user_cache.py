"""The per-user cache folder of eqprop, where re-creatable files (datasets, built kernels) go."""
from __future__ import annotations

import os
from pathlib import Path


def user_cache_folder(name: str) -> Path:
    """``$XDG_CACHE_HOME/eqprop/<name>`` (``~/.cache/eqprop/<name>`` when ``XDG_CACHE_HOME`` is
    unset or not absolute, as the XDG spec asks). Not created here."""
    xdg_cache = os.environ.get("XDG_CACHE_HOME", "")
    cache = Path(xdg_cache) if os.path.isabs(xdg_cache) else Path.home() / ".cache"
    return cache / "eqprop" / name
