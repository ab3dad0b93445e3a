"""Run outputs besides checkpoints: ``metrics.jsonl`` (one object per epoch) and ``curves.png``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_path, atomic_write_text
from ..plotting import PLOTS_AVAILABLE, Figure


def parameter_norms(model: torch.nn.Module) -> dict[str, float]:
    """``norm/<name>``: the Frobenius norm of every parameter (a runaway shows there first)."""
    with torch.no_grad():
        norms = [p.detach().double().norm() for p in model.parameters()]
        values = torch.stack(norms).tolist() if norms else []
    return {f"norm/{name}": value for (name, _), value in zip(model.named_parameters(), values)}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The epochs recorded in a metrics file (a torn last line from a crash is ignored)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    """Rewrite the whole metrics file atomically (used when resuming)."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one epoch's record as a JSON line."""
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def plot_curves(out_dir: Path, records: list[dict[str, Any]], title: str) -> None:
    """``curves.png``: train and test error (%) per epoch; ``angles.png``: the W–B^T angle
    per layer when the metrics have ``angle/...`` entries (vector-field models); ``norms.png``
    and ``states.png``: the parameters' norms and the test steady states' root mean square per
    layer. Nothing without matplotlib."""
    if not PLOTS_AVAILABLE:
        return
    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(epochs, [100 * r["train_error"] for r in records], "o-", label="train")
    ax.plot(epochs, [100 * r["test_error"] for r in records], "s-", label="test")
    _finish(fig, ax, out_dir / "curves.png", title, "error (%)")
    for prefix, name, what, ylabel in (("angle/", "angles.png", "angle between W and B^T", "angle (degrees)"),
                                       ("norm/", "norms.png", "parameter norms", "Frobenius norm"),
                                       ("test_state_rms/", "states.png", "free steady states (test)",
                                        "root mean square")):
        keys = sorted(k for k in records[-1] if k.startswith(prefix))
        if keys:
            fig = Figure(figsize=(6, 4))
            ax = fig.subplots()
            for key in keys:
                ax.plot(epochs, [r.get(key, float("nan")) for r in records], "o-", label=key.removeprefix(prefix))
            if prefix == "norm/":
                ax.set_yscale("log")
            _finish(fig, ax, out_dir / name, f"{title}: {what}", ylabel)


def _finish(fig: Any, ax: Any, path: Path, title: str, ylabel: str) -> None:
    """Label, then write the figure atomically."""
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write_path(path) as temporary:
        fig.savefig(temporary, dpi=100, format="png")
