"""Where the free phase of a trained network ends: a steady state, or a cycle between two states.

Synchronous updates of a layered network fall into a period-2 cycle, instead of settling,
once the gain of a loop between two layers nears 1. EP's estimates assume a steady state; the
C-VF rule in particular turns a cycle into a steady growth of that loop (module docstring of
``eqprop.estimators.continual``). For each checkpoint this script runs the free phase of
training batches for ``--steps`` steps with the run's own model and counts the samples whose
last step still moves the state (max-norm change above ``--tol``), and among them those that
return to the state of two steps before (a period-2 cycle).

    python benchmarks/free_phase_cycles.py benchmarks/reproduction/cvf-1h/best.pt \\
        benchmarks/reproduction/cvf-1h/checkpoint.pt --data-dir ../shared/data \\
        --json benchmarks/results/cpu/free_phase_cycles.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from eqprop import build
from eqprop.training import load_checkpoint
from eqprop.training.checkpoint import checkpoint_in
from eqprop.training.trainer import checkpoint_config


def largest_change(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Per sample, the max-norm difference of two states over every layer."""
    return torch.stack([(u - v).flatten(1).abs().amax(1) for u, v in zip(a, b)]).amax(0)


def count(path: Path, data_dir: str | None, batches: int, steps: int, tol: float) -> dict:
    """Samples at a steady state, in a period-2 cycle, or neither after ``steps`` free steps."""
    checkpoint = load_checkpoint(path)
    run = build.build_run(checkpoint_config(path, checkpoint), data_dir=data_dir)
    model = run.model
    model.load_state_dict(checkpoint["model"])
    counts = {"steady": 0, "period_2": 0, "neither": 0}
    with torch.no_grad():
        for index, (x, _) in enumerate(run.train_loader):
            if index == batches:
                break
            clamped = model.clamp(x)
            state = model.init_state(clamped.x)
            recent = []
            for _ in range(steps):
                state = model.step(clamped, state, 0.0, None)
                recent = (recent + [state])[-3:]
            moving = largest_change(recent[-1], recent[-2]) > tol
            cycling = moving & (largest_change(recent[-1], recent[-3]) <= tol)
            counts["steady"] += int((~moving).sum())
            counts["period_2"] += int(cycling.sum())
            counts["neither"] += int((moving & ~cycling).sum())
    return {"checkpoint": str(path), "epoch": int(checkpoint["epoch"]), "steps": steps, "tol": tol,
            "samples": sum(counts.values()), **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint files or run folders")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batches", type=int, default=300, help="training batches per checkpoint")
    parser.add_argument("--steps", type=int, default=200, help="free steps (far more than the presets' T1)")
    parser.add_argument("--tol", type=float, default=1e-4, help="a last-step change above this is not settled")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for given in args.checkpoints:
        path = checkpoint_in(given) if given.is_dir() else given
        result = count(path, args.data_dir, args.batches, args.steps, args.tol)
        results.append(result)
        print(f"{path} (epoch {result['epoch']}): of {result['samples']} samples after {args.steps} steps, "
              f"{result['steady']} steady, {result['period_2']} in a period-2 cycle, {result['neither']} neither")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
