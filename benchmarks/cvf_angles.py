"""The C-VF angle experiment of the continual-EP paper: test error against the initial angle Ψ
between the forward weights W and the transposed backward weights B^T.

Each angle is one ``eqprop train --preset cvf-1h --set model.backward_angle=Ψ`` run (B starts as
W^T with each entry's sign flipped with probability (1 - cos Ψ)/2), in
``benchmarks/results/cvf_angles/angle-<Ψ>/``, which keeps ``metrics.jsonl``, ``config.yaml``,
``command.txt`` and ``checkpoint.pt`` (a later ``run`` with more ``--epochs`` continues it).
``render`` prints the table and writes ``error_vs_angle.png`` from those files.

    python benchmarks/cvf_angles.py run --data-dir ../shared/data --angles 0 45 67.5 80 85 89 --epochs 10
    python benchmarks/cvf_angles.py render
"""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from eqprop.cli import main as eqprop_main
from eqprop.plotting import PLOTS_AVAILABLE, Figure

ROOT = Path(__file__).resolve().parent / "results" / "cvf_angles"
KEPT = ("metrics.jsonl", "config.yaml", "command.txt", "checkpoint.pt")


def folder(angle: float) -> Path:
    return ROOT / f"angle-{angle:g}"


def run(args: argparse.Namespace) -> None:
    for angle in args.angles:
        out = folder(angle)
        if (out / "checkpoint.pt").exists():
            command = ["train", "--resume", str(out), "--epochs", str(args.epochs), "--data-dir", args.data_dir,
                       "--no-progress"]
        else:
            # every angle trains its epochs: a run that never learns is a result here, not a dead run
            command = ["train", "--preset", "cvf-1h", "--set", f"model.backward_angle={angle:g}",
                       "--set", "train.stop_at_chance=null", "--epochs", str(args.epochs),
                       "--data-dir", args.data_dir, "--out", str(out), "--no-progress"]
        command += [part for assignment in args.overrides for part in ("--set", assignment)]
        code = eqprop_main(command)
        if code != 0:
            raise SystemExit(f"eqprop {' '.join(command)} failed with status {code}")
        repository = ROOT.parents[2]
        shown = ["DATA" if part == args.data_dir else str(out.relative_to(repository)) if part == str(out) else part
                 for part in command]
        with (out / "command.txt").open("a") as handle:
            handle.write("eqprop " + " ".join(shlex.quote(part) for part in shown) + "\n")
        for path in out.iterdir():
            if path.name not in KEPT:
                path.unlink()


def results() -> list[dict]:
    """Per recorded angle: its epochs, final and best test error, and the final W–B^T angles."""
    rows = []
    for path in ROOT.glob("angle-*/metrics.jsonl"):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not records:
            continue
        last = records[-1]
        rows.append({"angle": float(path.parent.name.removeprefix("angle-")), "epochs": last["epoch"],
                     "final": last["test_error"], "best": min(r["test_error"] for r in records),
                     "errors": {r["epoch"]: r["test_error"] for r in records},
                     "start_angles": {k.removeprefix("angle/"): v for k, v in records[0].items()
                                      if k.startswith("angle/")},
                     "final_angles": {k.removeprefix("angle/"): v for k, v in last.items()
                                      if k.startswith("angle/")}})
    return sorted(rows, key=lambda row: row["angle"])


def render() -> str:
    """The table (with every run's test error at the epoch all runs have reached, so that runs of
    different lengths compare) and the plot: one curve per epoch count, over the runs that reached it."""
    rows = results()
    common = min((row["epochs"] for row in rows), default=0)
    lines = [f"| initial angle Ψ | epochs | test error at epoch {common} | final test error | best test error "
             "| W–B^T angle after epoch 1 | after the last epoch |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        first = ", ".join(f"{v:.1f}°" for v in row["start_angles"].values())
        last = ", ".join(f"{v:.1f}°" for v in row["final_angles"].values())
        lines.append(f"| {row['angle']:g}° | {row['epochs']} | {100 * row['errors'][common]:.2f}% "
                     f"| {100 * row['final']:.2f}% | {100 * row['best']:.2f}% | {first} | {last} |")
    if rows and PLOTS_AVAILABLE:
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for epochs in sorted({r["epochs"] for r in rows}):
            reached = [r for r in rows if r["epochs"] >= epochs]
            ax.plot([r["angle"] for r in reached], [100 * r["errors"][epochs] for r in reached], "o-",
                    label=f"after epoch {epochs} ({len(reached)} runs)")
        ax.set_title("C-VF-1h: test error against the initial angle")
        ax.set_xlabel("initial angle between W and B^T (degrees)")
        ax.set_ylabel("test error (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(ROOT / "error_vs_angle.png", dpi=100)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="action", required=True)
    runs = commands.add_parser("run", help="train (or continue) one run per angle")
    runs.add_argument("--data-dir", required=True)
    runs.add_argument("--angles", type=float, nargs="+", required=True)
    runs.add_argument("--epochs", type=int, required=True, help="the epochs each run reaches")
    runs.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    commands.add_parser("render", help="print the table and write error_vs_angle.png")
    args = parser.parse_args()
    if args.action == "run":
        run(args)
    print(render())


if __name__ == "__main__":
    main()
