"""Reproduction records: one folder per paper row, and the table rendered from them.

A run that reproduces a paper row lives in ``benchmarks/reproduction/<preset>/``
(a faster solver's run of the same preset in ``<preset>@<solver>/``): the run
folder itself (``metrics.jsonl``, ``config.yaml``, ``checkpoint.pt`` to resume
it) plus ``record.json``, written by ``record``: the command, the commit, the
machine, the training seconds, the epochs run of the preset's, and the final
and best test error (fractions, as in ``metrics.jsonl``), and the epochs at which
the run collapsed and rolled back (``rolled_back.jsonl``). ``table`` renders
every record next to the paper's figure; a row without a record says
"not run".

    python benchmarks/reproduction.py record benchmarks/reproduction/ep-2h \\
        --command "eqprop train --preset ep-2h --data-dir DATA --out benchmarks/reproduction/ep-2h"
    python benchmarks/reproduction.py table            # --readme also writes it into README.md
    python benchmarks/reproduction.py curves ep-2h ep-2h@anderson --epochs 1 10 50 --keys test_error
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import yaml

from eqprop.presets import load_preset

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
    "mnist-kp-vf": (None, "not a paper row: CPU-sized unidirectional MLP, KP-VF (the paper's VF rows are CIFAR-10)"),
    "mnist-vf-symmetric": (None, "not a paper row: CPU-sized unidirectional MLP, symmetric VF"),
    "mnist-conv": (None, "Ernoult 2019 MNIST ConvNet with eqprop's training settings"),
    "cifar10-mse-one-sided": (0.8664, "Laborieux 2021 Table 2, MSE one-sided"),
    "cifar10-mse-random-sign": (0.2155, "Laborieux 2021 Table 2, MSE random-sign"),
    "cifar10-mse-symmetric": (0.1245, "Laborieux 2021 Table 2, MSE symmetric"),
    "cifar10-ce-symmetric": (0.1168, "Laborieux 2021 Table 2, CE symmetric"),
    "cifar10-bptt": (0.1112, "Laborieux 2021 Table 2, BPTT"),
    "cifar10-vf-symmetric": (0.7547, "Laborieux 2021 Table 2, unidirectional symmetric VF"),
    "cifar10-kp-vf": (0.132, "Laborieux 2021 Table 2, unidirectional KP-VF"),
    "cifar10-bptt-unidirectional": (0.0946, "Laborieux 2021 Table 2, unidirectional BPTT"),
}
#: rows whose paper figure is for an earlier epoch than the preset trains: compared at that epoch
PAPER_EPOCH = {"laborieux-mnist": 1}


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


def record(folder: Path, command: str, note: str | None, machine_name: str | None = None,
           commit_hash: str | None = None, stopped: str | None = None) -> dict:
    """Write ``folder/record.json`` from the run's metrics and configuration.

    ``machine_name`` and ``commit_hash`` describe a run made elsewhere (a lent GPU whose metrics
    came back here); by default, this machine and this checkout's commit. ``stopped``: why a run
    short of its epochs will not be continued (the table says so instead of "not finished")."""
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not metrics:
        raise SystemExit(f"{folder} has no completed epoch")
    # the paper's epochs: the preset's (a run made in pieces may stop short of them), else the run's own target
    preset = folder.name.split("@")[0]
    if preset in PAPER:
        target = load_preset(preset)["train"]["epochs"]
    else:
        target = yaml.safe_load((folder / "config.yaml").read_text())["train"]["epochs"]
    best = min(metrics, key=lambda r: r["test_error"])
    entry = {"command": command, "commit": commit_hash or commit(), "machine": machine_name or machine(),
             "training_seconds": sum(r["epoch_seconds"] for r in metrics), "epochs_run": metrics[-1]["epoch"],
             "epochs_target": target, "final_test_error": metrics[-1]["test_error"],
             "best_test_error": best["test_error"], "best_epoch": best["epoch"],
             "test_errors": [r["test_error"] for r in metrics]}
    rolled_back = folder / "rolled_back.jsonl"   # epochs a collapse undid (train.on_collapse: rollback)
    if rolled_back.exists():
        undone = [json.loads(line) for line in rolled_back.read_text().splitlines() if line.strip()]
        entry["collapses"] = [r["epoch"] for r in undone if "collapse" in r]
    if note:
        entry["note"] = note
    if stopped:
        entry["stopped"] = stopped
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
            ours = f"{100 * final:.2f}%, {100 * best:.2f}%"
            if entry.get("collapses"):
                ours += f"; collapsed at epoch {', '.join(map(str, entry['collapses']))} and rolled back"
            compared = final
            at = PAPER_EPOCH.get(preset)
            if at is not None and len(entry.get("test_errors", [])) >= at:
                compared = entry["test_errors"][at - 1]
                ours += f"; {100 * compared:.2f}% after epoch {at}"
            short = entry["epochs_run"] < entry["epochs_target"]
            difference = (f"(stopped: {entry['stopped']})" if short and entry.get("stopped")
                          else "" if paper is None else "(run not finished)" if short
                          else f"{100 * (compared - paper):+.2f} pt")
            epochs = f"{entry['epochs_run']} of {entry['epochs_target']}"
            lines.append(f"| `{name}`: {row} | {paper_text} | {ours} | {difference} | "
                         f"{epochs} | `{entry['command']}` | {entry['machine']} |")
    return "\n".join(lines)


def curves(rows: list[str], epochs: list[int], keys: list[str]) -> str:
    """Chosen epochs of several records side by side: each row's ``keys`` from its metrics
    (a row is a folder under ``benchmarks/reproduction``, or any folder with a ``metrics.jsonl``)."""
    folders = {row: ROOT / row if (ROOT / row).is_dir() else Path(row) for row in rows}
    metrics = {row: {r["epoch"]: r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())}
               for row, folder in folders.items()}
    header = ["epoch"] + [f"{row}: {key}" for row in rows for key in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for epoch in epochs:
        cells = [str(epoch)]
        for row in rows:
            for key in keys:
                value = metrics[row].get(epoch, {}).get(key)
                cells.append("" if value is None else f"{100 * value:.2f}%" if key.endswith("error")
                             else f"{value:.1e}" if "residual" in key else f"{value:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


README = ROOT.parents[1] / "README.md"
#: the lines around the table in the README, which ``table --readme`` rewrites
README_MARKERS = ("<!-- reproduction table: python benchmarks/reproduction.py table --readme -->",
                  "<!-- end of the reproduction table -->")


def readme_with_table(text: str, rendered: str) -> str:
    """``text`` (the README) with the part between :data:`README_MARKERS` replaced by ``rendered``."""
    start, end = README_MARKERS
    if start not in text or end not in text:
        raise SystemExit(f"the README has no reproduction table markers ({start} ... {end})")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    return f"{before}{start}\n{rendered}\n{end}{after}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="action", required=True)
    add = commands.add_parser("record", help="write a run folder's record.json")
    add.add_argument("folder", type=Path)
    add.add_argument("--command", required=True, help="the command that ran it (data root as DATA)")
    add.add_argument("--note", help="anything a reader must know (pieces, shared CPU)")
    add.add_argument("--machine", help="the hardware of a run made elsewhere (default: this machine)")
    add.add_argument("--commit", help="the commit of a run made elsewhere (default: this checkout's)")
    add.add_argument("--stopped", help="why a run short of its epochs will not be continued")
    show = commands.add_parser("table", help="print the reproduction table")
    show.add_argument("--readme", action="store_true", help="also write it into the README")
    compare = commands.add_parser("curves", help="chosen epochs of several records side by side")
    compare.add_argument("rows", nargs="+", help="folders under benchmarks/reproduction, or paths to run folders")
    compare.add_argument("--epochs", type=int, nargs="+", required=True)
    compare.add_argument("--keys", nargs="+", default=["test_error"], help="metrics.jsonl keys")
    args = parser.parse_args()
    if args.action == "curves":
        print(curves(args.rows, args.epochs, args.keys))
        return
    if args.action == "record":
        entry = record(args.folder, args.command, args.note, args.machine, args.commit, args.stopped)
        print(json.dumps(entry, indent=1))
        if entry["epochs_run"] < entry["epochs_target"] and not args.stopped:
            print(f"to continue it in a later session, commit {args.folder}/checkpoint.pt and best.pt with the "
                  "record where each is within the repository's 3 MB file limit: a machine's local files do not "
                  "outlive it", file=sys.stderr)
        return
    rendered = table()
    print(rendered)
    if args.readme:
        README.write_text(readme_with_table(README.read_text(), rendered))


if __name__ == "__main__":
    main()
