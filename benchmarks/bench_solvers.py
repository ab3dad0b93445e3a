"""Steps to the steady state: each solver against plain iteration, on fresh and trained networks.

For each preset's network (freshly initialised, then after ``--train-batches``
training batches of the preset itself, with its own fixed-step settings, on
the real data), on one batch of test images and for each solver:

- for ``tolerance``, ``alternating``, ``anderson`` and ``anderson-alt``
  (Anderson accelerating alternating sweeps), checking at every step,
  the steps (evaluations of the model's map) to bring every sample's residual
  (max-norm change in one step) to each tolerance of ``--tols``, capped at
  ``--cap`` (a solver that hits the cap says so);
- the wall time of a whole free phase at each tolerance (median of ``--repeats``);
- the max-norm distance of its final state from plain iteration run for
  ``--reference-factor`` x the preset's T1 steps (the steady state, as far as
  plain iteration gets);
- ``fixed`` at the preset's T1: the residual and distance the paper's setting
  leaves, which the tolerance of a faster solver should match;
- the nudged phase of the preset (β, T2) from the reference free state: the
  residual after T2 plain steps and the steps ``tolerance`` needs, which says
  whether the nudged phase converges at all.

Prints a table and writes JSON (``--json``); ``--render FILE... --tol T``
prints the markdown table of saved results at one tolerance. Example:

    python benchmarks/bench_solvers.py --presets ep-1h ep-2h --data-dir ../shared/data \\
        --train-batches 300 --json benchmarks/results/cpu/solvers.json
    python benchmarks/bench_solvers.py --render benchmarks/results/cpu/solvers.json --tol 1e-4
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from eqprop import build
from eqprop.config import RunConfig, validate_config
from eqprop.presets import load_preset
from eqprop.solvers import build_solver, state_change

#: the solvers compared, with their options (Anderson of synchronous steps and of alternating sweeps)
SOLVERS = {"tolerance": {}, "alternating": {}, "anderson": {}, "anderson-alt": {"sweep": "alternating"}}



def distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute difference of any unit of any sample between two states."""
    return float(state_change(a, b).max())


def measure(run: build.Run, x: torch.Tensor, target: torch.Tensor, args: argparse.Namespace) -> dict:
    """Every figure of the module docstring for the current weights of ``run.model``."""
    model, config = run.model, run.config
    t1, t2, beta = config.dynamics.t1, config.dynamics.t2, config.dynamics.beta
    runner = run.backend.runner("synchronous")
    model.eval()
    result: dict = {}
    with torch.no_grad():
        clamped = model.clamp(x)
        start = model.init_state(x)
        reference, _ = build_solver("fixed", runner)(model, clamped, start, args.reference_factor * t1)
        times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            paper, paper_stats = build_solver("fixed", runner)(model, clamped, start, t1)
            float(paper_stats.residual.max())
            times.append(time.perf_counter() - began)
        result["fixed_at_t1"] = {"steps": t1, "residual": float(paper_stats.residual.max()),
                                 "distance": distance(paper, reference), "seconds": statistics.median(times),
                                 "times": times}
        for key, options in SOLVERS.items():
            name = key.removesuffix("-alt")
            runner_of = run.backend.runner(options.get("sweep", build.solver_class(name).sweep))
            rows = {}
            for tol in args.tols:
                solver = build_solver(name, runner_of, tol=tol, check_every=1, **options)
                times = []
                for _ in range(args.repeats):
                    began = time.perf_counter()
                    state, stats = solver(model, clamped, start, args.cap)
                    float(stats.residual.max())  # wait for the device
                    times.append(time.perf_counter() - began)
                rows[f"{tol:g}"] = {"steps": stats.steps, "converged": stats.converged,
                                    "residual": float(stats.residual.max()),
                                    "distance": distance(state, reference),
                                    "fallbacks": int(stats.fallbacks),
                                    "seconds": statistics.median(times), "times": times}
            result[key] = rows
        nudged, nudged_stats = build_solver("fixed", runner)(model, clamped, reference, t2, beta, target)
        settle = build_solver("tolerance", runner, tol=min(args.tols), check_every=1)
        _, settle_stats = settle(model, clamped, reference, args.cap, beta, target)
        result["nudged"] = {"residual_at_t2": float(nudged_stats.residual.max()),
                            "tolerance_steps": settle_stats.steps, "converged": settle_stats.converged,
                            "final_residual": float(settle_stats.residual.max())}
    return result


def train_batches(run: build.Run, count: int) -> None:
    """``count`` training steps of the preset's own estimator and optimizer on the real data."""
    run.model.train()
    targets = torch.eye(run.model.head.classes, dtype=build.DTYPES[run.config.train.dtype], device=run.device)
    done = 0
    while done < count:
        for x, y in run.train_loader:
            run.estimator.train_step(run.model, x, targets[y], run.optimizer)
            done += 1
            if done == count:
                return


def bench_preset(name: str, args: argparse.Namespace) -> dict:
    data = load_preset(name)
    data["train"].update(device="cpu", batch_size=args.train_batch_size or data["train"]["batch_size"])
    if args.dtype:
        data["train"]["dtype"] = args.dtype
    config: RunConfig = validate_config(data)
    run = build.build_run(config, data_dir=args.data_dir, test_subset=args.batch)
    x, y = next(iter(run.test_loader))
    target = F.one_hot(y, run.model.head.classes).to(x.dtype)
    out = {"preset": name, "t1": config.dynamics.t1, "t2": config.dynamics.t2, "beta": config.dynamics.beta,
           "batch": x.shape[0], "backend": run.backend.name, "dtype": config.train.dtype}
    out["fresh"] = measure(run, x, target, args)
    report(name, "fresh", out["fresh"], config)
    if args.train_batches:
        began = time.perf_counter()
        train_batches(run, args.train_batches)
        out["train_batches"] = args.train_batches
        out["train_seconds"] = time.perf_counter() - began
        out["trained"] = measure(run, x, target, args)
        report(name, f"after {args.train_batches} batches", out["trained"], config)
    return out


def report(name: str, label: str, result: dict, config: RunConfig) -> None:
    fixed, nudged = result["fixed_at_t1"], result["nudged"]
    print(f"\n{name} ({label}): fixed T1={fixed['steps']}: {1e3 * fixed['seconds']:.1f} ms, residual "
          f"{fixed['residual']:.1e}, distance to the "
          f"steady state {fixed['distance']:.1e}; nudged phase: residual {nudged['residual_at_t2']:.1e} after "
          f"T2={config.dynamics.t2}, tolerance needs {nudged['tolerance_steps']} steps "
          f"({'converged' if nudged['converged'] else 'cap reached'}, {nudged['final_residual']:.1e})")
    print(f"{'solver':<12} {'tol':>7} {'steps':>6} {'ms':>9} {'distance':>9} {'fallbacks':>9}")
    for solver in SOLVERS:
        for tol, row in result[solver].items():
            flag = "" if row["converged"] else " (cap)"
            print(f"{solver:<12} {tol:>7} {row['steps']:>6} {1e3 * row['seconds']:>9.1f} {row['distance']:>9.1e} "
                  f"{row['fallbacks']:>9}{flag}")


def render(paths: list[str], tol: float) -> str:
    """A markdown table of saved results: per preset and network, the fixed T1 phase, then each
    solver at ``tol`` (steps, median and range of the phase's milliseconds, distance)."""
    lines = ["| preset | network | phase | steps | ms (median, range) | max residual | distance to steady state |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    key = f"{tol:g}"
    for path in paths:
        saved = json.loads(open(path).read())
        for entry in saved["presets"]:
            stages = [("fresh", "fresh")] + ([("trained", f"after {entry['train_batches']} batches")]
                                              if "trained" in entry else [])
            for stage, network in stages:
                result = entry[stage]
                fixed = result["fixed_at_t1"]
                rows = [("fixed, T1", fixed)] + [(f"{name}, tol {key}", result[name][key]) for name in SOLVERS
                                                 if key in result[name]]
                for label, row in rows:
                    times = [1e3 * t for t in row["times"]]
                    capped = "" if row.get("converged", True) else " (cap)"
                    lines.append(f"| {entry['preset']} (batch {entry['batch']}) | {network} | {label} | "
                                 f"{row['steps']}{capped} | {statistics.median(times):.1f} "
                                 f"({min(times):.1f}-{max(times):.1f}) | {row['residual']:.1e} | "
                                 f"{row['distance']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--render", nargs="+", metavar="JSON", help="print the table of saved results and stop")
    parser.add_argument("--tol", type=float, default=1e-4, help="with --render: the tolerance shown")
    parser.add_argument("--presets", nargs="+", default=["ep-1h", "ep-2h"])
    parser.add_argument("--data-dir")
    parser.add_argument("--batch", type=int, default=100, help="test images in the measured batch")
    parser.add_argument("--train-batches", type=int, default=0, help="train this many batches, then measure again")
    parser.add_argument("--train-batch-size", type=int, help="training batch size (default the preset's)")
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5])
    parser.add_argument("--cap", type=int, default=1000, help="most steps a solver may take")
    parser.add_argument("--reference-factor", type=int, default=10, help="reference: plain iteration for this x T1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "float64"], help="default: the preset's")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch's threads")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.render:
        print(render(args.render, args.tol))
        return
    if not args.data_dir:
        parser.error("--data-dir is needed to measure")
    torch.set_num_threads(args.threads)
    results = {"command": "python benchmarks/bench_solvers.py " + " ".join(__import__("sys").argv[1:]),
               "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": args.threads, "presets": [bench_preset(name, args) for name in args.presets]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
