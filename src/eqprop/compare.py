"""``eqprop compare RUN...``: several runs side by side, as a table and a plot of their curves.

Each run folder is read as training wrote it (``metrics.jsonl``, ``config.yaml``);
nothing is recomputed. The table gives each run's epochs, final and best test
error, median training seconds per epoch and mean free-phase steps; the plot
(with matplotlib) draws every run's test error per epoch.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .atomic import atomic_write_path
from .plotting import PLOTS_AVAILABLE, Figure
from .training.metrics import read_metrics


class CompareError(ValueError):
    """A folder that holds no run; one line."""


@dataclass
class RunSummary:
    """What the table shows of one run."""

    folder: Path
    name: str
    records: list[dict[str, Any]]

    @property
    def best(self) -> dict[str, Any]:
        return min(self.records, key=lambda r: r["test_error"])

    def row(self) -> list[str]:
        last, best = self.records[-1], self.best
        seconds = statistics.median(r["epoch_seconds"] for r in self.records)
        steps = [r["free_steps"] for r in self.records if "free_steps" in r]
        return [str(self.folder), self.name, str(last["epoch"]), f"{100 * last['test_error']:.2f}%",
                f"{100 * best['test_error']:.2f}% (epoch {best['epoch']})", f"{seconds:.1f}",
                f"{statistics.mean(steps):.1f}" if steps else "-"]


HEADER = ["run", "name", "epochs", "test error", "best test error", "s/epoch (median)", "free steps"]


def read_run(folder: Path) -> RunSummary:
    """The run in ``folder``; CompareError when it has no recorded epoch."""
    if not folder.is_dir():
        raise CompareError(f"{folder} is not a run folder (no such folder)")
    records = read_metrics(folder / "metrics.jsonl")
    if not records:
        raise CompareError(f"{folder} holds no recorded epoch (no metrics.jsonl lines)")
    try:
        name = str((yaml.safe_load((folder / "config.yaml").read_text(errors="replace")) or {}).get("name", folder.name))
    except (OSError, yaml.YAMLError):
        name = folder.name
    return RunSummary(folder, name, records)


def table(runs: list[RunSummary]) -> str:
    """A Markdown table of the runs."""
    rows = [HEADER, ["---"] * len(HEADER)] + [run.row() for run in runs]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def plot(runs: list[RunSummary], path: Path) -> bool:
    """Test error per epoch of every run into ``path``; False (nothing written) without matplotlib."""
    if not PLOTS_AVAILABLE:
        return False
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for run in runs:
        ax.plot([r["epoch"] for r in run.records], [100 * r["test_error"] for r in run.records], "o-", ms=3,
                label=f"{run.folder.name} ({run.name})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write_path(path) as temporary:
        fig.savefig(temporary, dpi=100, format="png")
    return True
