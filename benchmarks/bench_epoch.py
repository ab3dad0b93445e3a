"""Training epochs of a preset, timed as `eqprop train` times them, under several settings.

Runs one epoch (or ``--epochs``) of the preset per variant and repeat, the
variants alternating so that a change in the machine's load hits them alike,
and reports ``epoch_seconds`` (training only) with the test error. On Linux
it also reports the CPU time the hypervisor took from this virtual machine
during each run (``steal`` in /proc/stat), which makes epoch times on a shared
machine readable.

    python benchmarks/bench_epoch.py --preset laborieux-mnist --data-dir ../shared/data \\
        --variants kernel eager --repeats 3 --json out.json

``--busy N`` keeps N other processes busy (one core each) during the runs: a
default must hold on a loaded machine too. ``--solvers`` times the same variants once per solver setting, each a
comma-separated list of ``solver`` keys (``fixed``, or e.g.
``name=anderson,sweep=alternating,tol=1e-4``), and adds the mean free and
nudged steps per phase to the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from eqprop.config import apply_override, validate_config
from eqprop.presets import load_preset
from eqprop.training.trainer import train

#: each variant's changes to the preset's ``train`` section
VARIANTS = {
    "auto": {"cpu_kernels": "auto", "threads": "auto", "cpu_kernel_threads": "auto"},  # the defaults
    "kernel": {"cpu_kernels": True, "threads": 1, "cpu_kernel_threads": None},   # kernel on every core
    "kernel-1-thread": {"cpu_kernels": True, "threads": 1, "cpu_kernel_threads": 1},
    "eager": {"cpu_kernels": False, "threads": 1},                               # PyTorch on 1 thread
    "eager-all-threads": {"cpu_kernels": False, "threads": os.cpu_count()},      # PyTorch on every core
}


class BusyProcesses:
    """``count`` processes that keep one core each busy while the runs are timed (a loaded machine)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> "BusyProcesses":
        self.processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.count)]
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


def stolen_seconds() -> float | None:
    """CPU seconds taken by the hypervisor so far, all cores together (Linux; else None)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else None


def solver_section(setting: str) -> dict[str, object]:
    """``fixed``, or ``key=value,key=value`` (values read as YAML), as a ``solver`` section."""
    if setting == "fixed":
        return {"name": "fixed"}
    section = {}
    for pair in setting.split(","):
        key, _, value = pair.partition("=")
        section[key.strip()] = yaml.safe_load(value)
    return section


def summary(paths: list[str]) -> str:
    """A Markdown table of median epoch seconds per variant (and the range) from result files."""
    lines = ["| preset | other busy processes | variant | what ran | epoch seconds, median (range) | runs |",
             "| --- | --- | --- | --- | --- | --- |"]
    for path in paths:
        data = json.loads(Path(path).read_text())
        meta, rows = data["meta"], data["results"]
        for variant in dict.fromkeys(r["variant"] for r in rows):
            mine = [r for r in rows if r["variant"] == variant]
            seconds = [r["epoch_seconds"] for r in mine]
            ran = sorted({_what_ran(r) for r in mine})
            lines.append(f"| {meta['preset']} | {meta.get('busy', 0)} | {variant} | {'; '.join(ran)} | "
                         f"{statistics.median(seconds):.2f} ({min(seconds):.2f}-{max(seconds):.2f}) | {len(seconds)} |")
    return "\n".join(lines)


def _what_ran(row: dict[str, object]) -> str:
    setting = row.get("setting") or {}
    if setting.get("cpu_kernels"):
        return f"kernel, {row.get('cpu_kernel_threads', '?')} thread(s)"
    return f"PyTorch, {row.get('torch_threads', setting.get('threads', '?'))} thread(s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", nargs="+", metavar="JSON", help="print the table of earlier result files, "
                                                                     "run nothing")
    parser.add_argument("--preset", default="laborieux-mnist")
    parser.add_argument("--data-dir")
    parser.add_argument("--variants", nargs="+", default=["kernel", "eager"], choices=sorted(VARIANTS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--solvers", nargs="+", default=["fixed"],
                        help="solver settings, each 'fixed' or key=value pairs joined by commas")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting of the preset for every run (repeatable)")
    parser.add_argument("--busy", type=int, default=0, help="other processes kept busy during the runs")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.summary:
        print(summary(args.summary))
        return
    if not args.data_dir:
        parser.error("--data-dir is required to run")
    with BusyProcesses(args.busy):
        rows = run_variants(args)
    print("median epoch seconds: " + ", ".join(
        f"{variant} {statistics.median(r['epoch_seconds'] for r in rows if r['variant'] == variant):.2f}"
        for variant in args.variants))
    if args.json:
        meta = {"preset": args.preset, "device": args.device, "torch": torch.__version__, "busy": args.busy,
                "machine": platform.machine(), "processor": platform.processor(), "cores": os.cpu_count(),
                "command": "python benchmarks/bench_epoch.py " + " ".join(sys.argv[1:])}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))


def run_variants(args: argparse.Namespace) -> list[dict[str, object]]:
    """Train each variant and solver ``args.repeats`` times in alternation; one row per epoch."""
    rows = []
    print(f"{'variant':<18}{'solver':<44}{'run':>4}{'epoch':>6}{'seconds':>9}{'steal s':>9}{'test error':>12}"
          f"{'free':>7}{'nudged':>7}")
    for repeat in range(1, args.repeats + 1):
        for variant, solver in [(v, s) for s in args.solvers for v in args.variants]:
            data = load_preset(args.preset)
            for assignment in args.overrides:
                apply_override(data, assignment)
            data["train"].update(epochs=args.epochs, device=args.device, **VARIANTS[variant])
            data["solver"] = solver_section(solver)
            config = validate_config(data)
            with tempfile.TemporaryDirectory() as out:
                before, start = stolen_seconds(), time.perf_counter()
                notes: list[str] = []
                records = train(config, Path(out) / "run", data_dir=args.data_dir, log=notes.append)
                wall = time.perf_counter() - start
                after = stolen_seconds()
                chosen = {key: value for key, value in
                          yaml.safe_load((Path(out) / "run" / "config.yaml").read_text())["train"].items()
                          if key in ("cpu_kernels", "cpu_kernel_threads", "threads")}
            steal = None if before is None or after is None else after - before
            for record in records:
                steps = {key: value for key, value in record.items()
                         if key.startswith(("free_", "nudged_")) or key == "cpu_kernel_threads"}
                steps["torch_threads"] = torch.get_num_threads()  # as the run left it
                rows.append({"variant": variant, "solver": solver, "repeat": repeat, "epoch": record["epoch"],
                             "epoch_seconds": record["epoch_seconds"], "test_error": record["test_error"],
                             "run_wall_seconds": wall, "run_steal_seconds": steal, "setting": chosen, **steps})
                print(f"{variant:<18}{solver:<44}{repeat:>4}{record['epoch']:>6}{record['epoch_seconds']:>9.2f}"
                      f"{'' if steal is None else f'{steal:.2f}':>9}{100 * record['test_error']:>11.2f}%"
                      f"{record.get('free_steps', float('nan')):>7.1f}{record.get('nudged_steps', float('nan')):>7.1f}")
    return rows


if __name__ == "__main__":
    main()
