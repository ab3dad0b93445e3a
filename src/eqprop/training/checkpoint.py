"""Checkpoints: verified, written atomically, read without unpickling arbitrary objects.

A checkpoint is a dict of tensors and plain values. It is stored as the bytes
``torch.save`` makes of it (held as a uint8 tensor, written raw: pickle's
protocol 2, the one ``weights_only`` loading reads, would store them as a
Latin-1 string, half as large again), with their SHA-256 digest and the
fingerprint of the run's model (:func:`config_fingerprint`) beside them, in one
``torch.save`` file loaded with ``weights_only=True`` (a file from elsewhere
cannot run code). Loading checks the digest, so a flipped byte anywhere is a
one-line refusal rather than a silently different model, and, where the
caller knows the run it belongs to, the fingerprint. Writing refuses a state
with NaN or inf, and reads the new file back before it replaces the old one:
a checkpoint is never replaced by one that cannot be loaded. Files of
version 1 (before digests) and 2 (the bytes pickled) are still read.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_path
from ..config import ConfigError, validate_config

FORMAT = "eqprop-checkpoint"
VERSION = 3
CHECKPOINT = "checkpoint.pt"   # a run folder's latest epoch
BEST_CHECKPOINT = "best.pt"    # its epoch of lowest test error so far


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the run; one-line message."""


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """What identifies a run's model: its ``model`` section and dataset (plain configuration
    data, with the defaults of fields it leaves out), hashed. Training settings (epochs, rates,
    solver) may change on resume; these not."""
    try:
        config = validate_config(dict(config)).model_dump(mode="json")
    except ConfigError:
        pass   # a configuration this release cannot read: fingerprinted as it is
    identity = {"model": config.get("model"), "dataset": (config.get("data") or {}).get("dataset")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically, with its digest and its configuration's
    fingerprint. Refuses a payload holding NaN or inf; the written file is read back and
    verified before it replaces ``path``, so ``path`` always holds a loadable checkpoint."""
    path = Path(path)
    bad = next(_non_finite(payload), None)
    if bad is not None:
        raise CheckpointError(f"{path} was not written: {bad} holds NaN or inf")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    content = buffer.getvalue()
    config = payload.get("config")
    wrapper = {"format": FORMAT, "version": VERSION, "digest": hashlib.sha256(content).hexdigest(),
               "fingerprint": config_fingerprint(config) if isinstance(config, Mapping) else None,
               "content": torch.frombuffer(bytearray(content), dtype=torch.uint8)}
    with atomic_write_path(path) as temporary:
        torch.save(wrapper, temporary)
        load_checkpoint(temporary)   # what replaces the old file must load


def load_checkpoint(path: Path, fingerprint: str | None = None) -> dict[str, Any]:
    """Read an eqprop checkpoint onto the CPU, verified: its digest, and with ``fingerprint``
    that it holds the model of that run. Anything else is a one-line :class:`CheckpointError`."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder: give a checkpoint file, or use checkpoint_in({path})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is damaged or not an eqprop checkpoint (not a complete torch.save file)")
    wrapper = _torch_load(path, io.BytesIO(path.read_bytes()))
    if not isinstance(wrapper, dict) or wrapper.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an eqprop checkpoint")
    version = wrapper.get("version")
    if version == 1:   # written before digests: its payload is the file itself
        return wrapper
    if version not in (2, VERSION):
        raise CheckpointError(f"checkpoint {path} has format version {version}, this eqprop reads versions 1 "
                              f"to {VERSION}")
    content = wrapper.get("content")
    if isinstance(content, torch.Tensor) and content.dtype == torch.uint8 and content.dim() == 1:
        content = content.numpy().tobytes()
    if not isinstance(content, bytes) or hashlib.sha256(content).hexdigest() != wrapper.get("digest"):
        raise CheckpointError(f"checkpoint {path} is damaged: its contents do not match their digest")
    if fingerprint is not None and wrapper.get("fingerprint") != fingerprint:
        raise CheckpointError(f"checkpoint {path} holds the model of another run (another model or dataset "
                              "than this run folder's config.yaml)")
    payload = _torch_load(path, io.BytesIO(content))
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} is damaged: it holds no checkpoint")
    return payload


def load_model_state(model: torch.nn.Module, state: Mapping[str, Any], path: Path) -> None:
    """Load a checkpoint's model weights into ``model``, or say in one whole line how they differ
    (missing and unexpected weights, shapes)."""
    own = model.state_dict()
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    shapes = [f"{key} is {list(state[key].shape)} there, {list(own[key].shape)} here" for key in own
              if key in state and isinstance(state[key], torch.Tensor) and state[key].shape != own[key].shape]
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
        ([f"unexpected {', '.join(unexpected)}"] if unexpected else []) + shapes
    if problems:
        raise CheckpointError(f"checkpoint {path} holds another model than this run's: {'; '.join(problems)}")
    model.load_state_dict(state)


def checkpoint_in(path: Path) -> Path:
    """``path`` itself for a file; for a run folder, its latest checkpoint (``checkpoint.pt``)."""
    path = Path(path)
    if not path.is_dir():
        return path
    latest = path / CHECKPOINT
    if not latest.is_file():
        raise CheckpointError(f"{path} holds no {CHECKPOINT}: no epoch of a run was completed there")
    return latest


def _torch_load(path: Path, source: io.BytesIO) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for damaged or foreign files
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise CheckpointError(f"{path} was refused: it holds Python objects other than tensors and plain "
                                  "values, which eqprop does not unpickle") from None
        raise CheckpointError(f"checkpoint {path} is damaged or not an eqprop checkpoint "
                              f"({type(error).__name__})") from None


def _non_finite(value: Any, where: str = "the checkpoint") -> Iterator[str]:
    """The places in ``value`` (nested dicts, lists, tensors) holding a NaN or inf."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            yield where
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _non_finite(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _non_finite(item, f"{where}[{index}]")
