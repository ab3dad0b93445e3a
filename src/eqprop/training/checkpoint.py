"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint is a dict of tensors and plain values (``torch.save``), loaded
with ``weights_only=True`` so a file from elsewhere cannot run code.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_path

FORMAT = "eqprop-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the run; one-line message."""


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a crash leaves the previous file intact."""
    with atomic_write_path(Path(path)) as temporary:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, temporary)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read an eqprop checkpoint onto the CPU, refusing anything else with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is corrupt or not an eqprop checkpoint (not a complete torch.save file)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or foreign files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not an eqprop checkpoint ({reason[:120]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an eqprop checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {payload.get('version')}, "
                              f"this eqprop reads version {VERSION}")
    return payload
