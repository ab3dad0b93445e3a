"""Training at equal error: whole runs of a preset with the papers' fixed steps and with solvers.

Each run is ``eqprop train`` with the preset and the run's settings; its
folder under ``benchmarks/results/solver_runs/<preset>/<label>-seed<N>/``
keeps ``metrics.jsonl``, ``config.yaml`` and ``command.txt`` (the checkpoints
and plots are dropped: the record is the metrics). ``--render`` prints the
table of every recorded run from those files: final test error, mean free and
nudged steps per phase, and mean training seconds per epoch.

    python benchmarks/solver_runs.py --data-dir ../shared/data --preset laborieux-mnist \\
        --label fixed --seeds 0 1
    python benchmarks/solver_runs.py --data-dir ../shared/data --preset laborieux-mnist \\
        --label alternating --seeds 0 --set solver.name=alternating --set solver.tol=1e-4
    python benchmarks/solver_runs.py --render
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from eqprop.cli import main as eqprop_main

ROOT = Path(__file__).resolve().parent / "results" / "solver_runs"
KEPT = ("metrics.jsonl", "config.yaml", "command.txt")


def run(args: argparse.Namespace) -> None:
    for seed in args.seeds:
        out = ROOT / args.preset / f"{args.label}-seed{seed}"
        if out.exists():
            raise SystemExit(f"{out} exists: remove it to run again")
        command = ["train", "--preset", args.preset, "--seed", str(seed), "--data-dir", args.data_dir,
                   "--out", str(out), "--no-progress"]
        for assignment in args.overrides:
            command += ["--set", assignment]
        code = eqprop_main(command)
        if code != 0:
            raise SystemExit(f"eqprop {' '.join(command)} failed with status {code}")
        shown = [part if part != args.data_dir else "DATA" for part in command]
        (out / "command.txt").write_text("eqprop " + " ".join(shlex.quote(part) for part in shown) + "\n")
        for path in out.iterdir():
            if path.name not in KEPT:
                path.unlink()


def render() -> str:
    """The markdown table of every recorded run."""
    lines = ["| preset | run | seed | epochs | test error | free steps | nudged steps | s/epoch (training) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for folder in sorted(ROOT.glob("*/*-seed*")):
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
        if not records:
            continue
        label, _, seed = folder.name.rpartition("-seed")
        last = records[-1]
        free = statistics.mean(r["free_steps"] for r in records)
        nudged = statistics.mean(r["nudged_steps"] for r in records)
        seconds = statistics.mean(r["epoch_seconds"] for r in records)
        lines.append(f"| {folder.parent.name} | {label} | {seed} | {last['epoch']} | {100 * last['test_error']:.2f}% "
                     f"| {free:.1f} | {nudged:.1f} | {seconds:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="print the table of the recorded runs and stop")
    parser.add_argument("--data-dir")
    parser.add_argument("--preset")
    parser.add_argument("--label", help="the run's name in the table (e.g. fixed, alternating)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.render:
        print(render())
        return
    if not (args.data_dir and args.preset and args.label):
        parser.error("--data-dir, --preset and --label are needed to run")
    run(args)


if __name__ == "__main__":
    sys.exit(main())
