"""Seconds per training epoch of a preset in one process and in N processes (torchrun, gloo on the
CPU), alternating, with the distributed run's all-reduce of the estimate at every batch.

    python benchmarks/bench_distributed.py --preset laborieux-mnist --data-dir ../shared/data \\
        --processes 2 --repeats 2 --json out.json

Each run trains ``--epochs`` epochs into a temporary folder; the epoch seconds (training only) come
from its metrics.jsonl. On one machine the processes share its cores: the figure is the cost of the
distributed path, not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace, processes: int) -> list[float]:
    """Train once; the seconds of each epoch."""
    with tempfile.TemporaryDirectory() as folder:
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                     "--master-port", str(free_port()), "-m", "eqprop"] if processes > 1
                    else [sys.executable, "-m", "eqprop"])
        command = [*launcher, "train", "--preset", args.preset, "--data-dir", args.data_dir, "--epochs",
                   str(args.epochs), "--out", str(Path(folder) / "run"), "--no-progress"]
        for assignment in args.overrides:
            command += ["--set", assignment]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-2000:]}")
        lines = (Path(folder) / "run" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["epoch_seconds"] for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="laborieux-mnist")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json")
    args = parser.parse_args()
    seconds: dict[int, list[float]] = {1: [], args.processes: []}
    for _ in range(args.repeats):
        for processes in seconds:
            seconds[processes] += run(args, processes)
            print(f"{processes} process(es): {seconds[processes][-1]:.2f} s", flush=True)
    medians = {n: statistics.median(values) for n, values in seconds.items()}
    print(f"median epoch seconds: 1 process {medians[1]:.2f}, {args.processes} processes "
          f"{medians[args.processes]:.2f} ({medians[args.processes] / medians[1]:.2f}x)")
    if args.json:
        meta = {"preset": args.preset, "torch": torch.__version__, "cores": os.cpu_count(),
                "machine": platform.machine(), "command": "python benchmarks/bench_distributed.py " + " ".join(sys.argv[1:])}
        Path(args.json).write_text(json.dumps({"meta": meta, "seconds": {str(k): v for k, v in seconds.items()}},
                                              indent=1))


if __name__ == "__main__":
    main()
