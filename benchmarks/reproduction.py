"""Reproduction records: one folder per paper row, and the table rendered from them.

A run that reproduces a paper row lives in ``benchmarks/reproduction/<preset>/``
(a faster solver's run of the same preset in ``<preset>@<solver>/``): the run
folder itself (``metrics.jsonl``, ``config.yaml``, ``checkpoint.pt`` to resume
it) plus ``record.json``, written by ``record``: the command, the commit, the
machine, the training seconds, the epochs run of the preset's, and the final
and best test error (fractions, as in ``metrics.jsonl``). ``table`` renders
every record next to the paper's figure; a row without a record says
"not run".

    python benchmarks/reproduction.py record benchmarks/reproduction/ep-2h \\
        --command "eqprop train --preset ep-2h --data-dir DATA --out benchmarks/reproduction/ep-2h"
    python benchmarks/reproduction.py table
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from pathlib import Path

from eqprop.training import load_checkpoint
from eqprop.training.checkpoint import CHECKPOINT

ROOT = Path(__file__).resolve().parent / "reproduction"

#: the papers' test errors of the rows that presets reproduce (fractions; None: no single figure)
PAPER = {
    "ep-1h": (0.02, "C-EP paper, EP-1h (about 2%)"),
    "ep-2h": (0.02, "C-EP paper, EP-2h (about 2%)"),
    "cep-1h": (0.025, "C-EP paper, C-EP-1h (2-2.5%)"),
    "cep-2h": (0.025, "C-EP paper, C-EP-2h (2-2.5%)"),
    "cvf-1h": (None, "C-EP paper, C-VF-1h (degrades with the initial angle)"),
    "cvf-2h": (None, "C-EP paper, C-VF-2h (degrades with the initial angle)"),
    "laborieux-mnist": (0.0411, "Laborieux 2021 authors' MNIST command (95.89% accuracy after 1 epoch)"),
    "cifar10-mse-one-sided": (0.8664, "Laborieux 2021 Table 2, MSE one-sided"),
    "cifar10-mse-random-sign": (0.2155, "Laborieux 2021 Table 2, MSE random-sign"),
    "cifar10-mse-symmetric": (0.1245, "Laborieux 2021 Table 2, MSE symmetric"),
    "cifar10-ce-symmetric": (0.1168, "Laborieux 2021 Table 2, CE symmetric"),
    "cifar10-bptt": (0.1112, "Laborieux 2021 Table 2, BPTT"),
    "cifar10-vf-symmetric": (0.7547, "Laborieux 2021 Table 2, unidirectional symmetric VF"),
    "cifar10-kp-vf": (0.132, "Laborieux 2021 Table 2, unidirectional KP-VF"),
    "cifar10-bptt-unidirectional": (0.0946, "Laborieux 2021 Table 2, unidirectional BPTT"),
}


def machine() -> str:
    """The CPU model and the cores this process may use."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def record(folder: Path, command: str, note: str | None) -> dict:
    """Write ``folder/record.json`` from the run's metrics and configuration."""
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not metrics:
        raise SystemExit(f"{folder} has no completed epoch")
    target = load_checkpoint(folder / CHECKPOINT)["config"]["train"]["epochs"]
    best = min(metrics, key=lambda r: r["test_error"])
    entry = {"command": command, "commit": commit(), "machine": machine(),
             "training_seconds": sum(r["epoch_seconds"] for r in metrics), "epochs_run": metrics[-1]["epoch"],
             "epochs_target": target, "final_test_error": metrics[-1]["test_error"],
             "best_test_error": best["test_error"], "best_epoch": best["epoch"]}
    if note:
        entry["note"] = note
    (folder / "record.json").write_text(json.dumps(entry, indent=1) + "\n")
    return entry


def table() -> str:
    """The reproduction table: paper figure, eqprop figure, difference, epochs run, command, hardware."""
    lines = ["| row | paper | eqprop (final, best) | difference | epochs run | command | hardware |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    folders = {path.parent.name: path.parent for path in sorted(ROOT.glob("*/record.json"))}
    for preset, (paper, row) in PAPER.items():
        runs = [name for name in folders if name == preset or name.startswith(preset + "@")] or [None]
        for name in runs:
            paper_text = "–" if paper is None else f"{100 * paper:.2f}%"
            if name is None:
                lines.append(f"| `{preset}`: {row} | {paper_text} | not run | | | | |")
                continue
            entry = json.loads((folders[name] / "record.json").read_text())
            final, best = entry["final_test_error"], entry["best_test_error"]
            difference = "" if paper is None else f"{100 * (final - paper):+.2f} pt"
            epochs = f"{entry['epochs_run']} of {entry['epochs_target']}"
            lines.append(f"| `{name}`: {row} | {paper_text} | {100 * final:.2f}%, {100 * best:.2f}% | {difference} | "
                         f"{epochs} | `{entry['command']}` | {entry['machine']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="action", required=True)
    add = commands.add_parser("record", help="write a run folder's record.json")
    add.add_argument("folder", type=Path)
    add.add_argument("--command", required=True, help="the command that ran it (data root as DATA)")
    add.add_argument("--note", help="anything a reader must know (pieces, shared CPU)")
    commands.add_parser("table", help="print the reproduction table")
    args = parser.parse_args()
    if args.action == "record":
        print(json.dumps(record(args.folder, args.command, args.note), indent=1))
    else:
        print(table())


if __name__ == "__main__":
    main()
