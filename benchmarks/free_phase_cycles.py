"""Where the free phase of a trained network ends, and what its unsettled samples do to the weights.

Synchronous updates of a layered network fall into a period-2 cycle, instead of settling,
once the gain of a loop between two layers nears 1. EP's estimates assume a steady state; the
C-VF rule in particular turns a cycle into a steady growth of that loop (module docstring of
``eqprop.estimators.continual``). For each checkpoint this script measures, on training batches:

- **cycles**: the free phase run for ``--steps`` steps with the run's own model; the samples
  whose last step still moves the state (max-norm change above ``--tol``), among them those
  back at the state of two steps before (a period-2 cycle), and the median size of their last
  step (the cycle's amplitude, in units of the state);
- **push** (continual runs only): the run's own estimator at η → 0, at +β and at -β, with and
  without ``settle_tol``; the difference is what the unsettled samples add. For each weight
  matrix it reports, per sample, ``⟨Δ, θ⟩ / |θ|`` (the rate at which that sample's update
  grows the matrix's norm, per unit of learning rate) for the unsettled samples and for the
  settled ones, and how many of each there were.

    python benchmarks/free_phase_cycles.py benchmarks/reproduction/cvf-1h/best.pt \\
        benchmarks/reproduction/cvf-1h/checkpoint.pt --data-dir ../shared/data \\
        --json benchmarks/results/cpu/free_phase_cycles.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from eqprop import build
from eqprop.estimators.continual import ContinualEP
from eqprop.training import load_checkpoint
from eqprop.training.checkpoint import checkpoint_in
from eqprop.training.trainer import checkpoint_config


def largest_change(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Per sample, the max-norm difference of two states over every layer."""
    return torch.stack([(u - v).flatten(1).abs().amax(1) for u, v in zip(a, b)]).amax(0)


def cycles(run: build.Run, batches: int, steps: int, tol: float) -> dict:
    """Samples at a steady state, in a period-2 cycle, or neither after ``steps`` free steps."""
    model = run.model
    counts = {"steady": 0, "period_2": 0, "neither": 0}
    amplitudes = []
    for index, (x, _) in enumerate(run.train_loader):
        if index == batches:
            break
        clamped = model.clamp(x)
        state = model.init_state(clamped.x)
        recent = []
        for _ in range(steps):
            state = model.step(clamped, state, 0.0, None)
            recent = (recent + [state])[-3:]
        last = largest_change(recent[-1], recent[-2])
        moving = last > tol
        cycling = moving & (largest_change(recent[-1], recent[-3]) <= tol)
        counts["steady"] += int((~moving).sum())
        counts["period_2"] += int(cycling.sum())
        counts["neither"] += int((moving & ~cycling).sum())
        amplitudes.append(last[cycling])
    amplitude = torch.cat(amplitudes)
    return {"steps": steps, "tol": tol, "samples": sum(counts.values()), **counts,
            "cycle_amplitude_median": float(amplitude.median()) if amplitude.numel() else None}


def push(run: build.Run, batches: int, settle_tol: float) -> dict:
    """Per sample, how much the unsettled and the settled samples' updates grow each weight's norm."""
    model, phases = run.model, run.estimator.phases
    kind = type(run.estimator)
    weights = {name: p for name, p in model.named_parameters() if p.dim() == 2}
    norms = {name: float(p.norm()) for name, p in weights.items()}   # η = 0: the weights never move
    sums = {group: {name: 0.0 for name in weights} for group in ("unsettled", "settled")}
    counts = {"unsettled": 0, "settled": 0}
    for sign in (1.0, -1.0):
        signed = dataclasses.replace(phases, beta=sign * abs(phases.beta))
        every, gated = kind(signed), kind(signed, settle_tol=settle_tol)
        for index, (x, y) in enumerate(run.train_loader):
            if index == batches:
                break
            whole = every.estimate(model, x, y, lr=0.0)
            kept = gated.estimate(model, x, y, lr=0.0)
            left_out = int(kept.nudged_stats.excluded)
            counts["unsettled"] += left_out
            counts["settled"] += x.shape[0] - left_out
            by_id = {id(p): (w, k) for p, w, k in zip(model.trainable_parameters(), whole.direction,
                                                      kept.direction)}
            for name, p in weights.items():
                w, k = by_id[id(p)]
                # directions are batch means: times B, a sum over the batch's samples
                sums["unsettled"][name] += float(((w - k) * p).sum()) * x.shape[0] / norms[name]
                sums["settled"][name] += float((k * p).sum()) * x.shape[0] / norms[name]
    return {"settle_tol": settle_tol, "batches": batches, "samples": counts,
            "norm_growth_per_sample": {group: {name: total / max(counts[group], 1) for name, total in by.items()}
                                       for group, by in sums.items()}}


def measure(path: Path, data_dir: str | None, batches: int, steps: int, tol: float,
            push_batches: int, settle_tol: float) -> dict:
    checkpoint = load_checkpoint(path)
    run = build.build_run(checkpoint_config(path, checkpoint), data_dir=data_dir)
    run.model.load_state_dict(checkpoint["model"])
    result = {"checkpoint": str(path), "epoch": int(checkpoint["epoch"])}
    with torch.no_grad():
        result.update(cycles(run, batches, steps, tol))
        if isinstance(run.estimator, ContinualEP) and push_batches:
            result["push"] = push(run, push_batches, settle_tol)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint files or run folders")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batches", type=int, default=300, help="training batches per checkpoint")
    parser.add_argument("--steps", type=int, default=200, help="free steps (far more than the presets' T1)")
    parser.add_argument("--tol", type=float, default=1e-4, help="a last-step change above this is not settled")
    parser.add_argument("--push-batches", type=int, default=100, help="batches per sign for the push (0: none)")
    parser.add_argument("--settle-tol", type=float, default=1e-3, help="the push's settle_tol")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for given in args.checkpoints:
        path = checkpoint_in(given) if given.is_dir() else given
        result = measure(path, args.data_dir, args.batches, args.steps, args.tol, args.push_batches,
                         args.settle_tol)
        results.append(result)
        print(f"{path} (epoch {result['epoch']}): of {result['samples']} samples after {args.steps} steps, "
              f"{result['steady']} steady, {result['period_2']} in a period-2 cycle (median amplitude "
              f"{result['cycle_amplitude_median']}), {result['neither']} neither")
        if "push" in result:
            growth = result["push"]["norm_growth_per_sample"]
            print(f"  per-sample norm growth, unsettled {result['push']['samples']['unsettled']} samples: "
                  f"{growth['unsettled']}; settled: {growth['settled']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
