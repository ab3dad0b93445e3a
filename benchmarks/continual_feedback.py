"""How much continual EP/VF's own updates change its nudged phase: the evidence for C-VF's runaway.

C-EP and C-VF move the weights at every nudged step, and the next step runs with the moved
weights (``eqprop.estimators.continual``). As η → 0 their total update divided by η is the
frozen-weight estimate; at the training rates the phase feeds back on itself. For a run folder's
checkpoint this script takes training batches and, for β > 0 and β < 0 and the run's learning
rates times each factor, measures per batch

    gap = |Σ_t Δ_θ(t) at those rates - Σ_t Δ_θ(t) at η → 0| / |Σ_t Δ_θ(t) at η → 0|

over every trainable parameter, and prints the median and the largest gap over the batches
(the model is restored after each phase). A gap of 1 means the updates are twice what the rule's
η → 0 limit asks for (or point elsewhere): a phase that runs away has gaps far above 1.

    python benchmarks/continual_feedback.py benchmarks/reproduction/cvf-1h --data-dir ../shared/data \\
        --batches 200 --factors 0.5 1 2 --json benchmarks/results/cpu/continual_feedback_cvf1h.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from eqprop import build
from eqprop.estimators.continual import ContinualEP, ContinualVF
from eqprop.training import load_checkpoint
from eqprop.training.checkpoint import checkpoint_in
from eqprop.training.trainer import checkpoint_config


def gap(direction: list[torch.Tensor], limit: list[torch.Tensor]) -> float:
    difference = sum(float((a - b).double().square().sum()) for a, b in zip(direction, limit))
    size = sum(float(b.double().square().sum()) for b in limit)
    return (difference / max(size, 1e-300)) ** 0.5


def measure(folder: Path, data_dir: str, batches: int, factors: list[float]) -> dict:
    path = checkpoint_in(folder)
    checkpoint = load_checkpoint(path)
    config = checkpoint_config(path, checkpoint)
    if config.estimator.name not in ("c_ep", "c_vf"):
        raise SystemExit(f"{folder} trains with {config.estimator.name}, not a continual estimator")
    run = build.build_run(config, data_dir=data_dir)
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    rates = [group["lr"] for group in run.optimizer.param_groups]  # per layer, as trained
    kind = ContinualVF if config.estimator.name == "c_vf" else ContinualEP
    results = {"folder": str(folder), "epoch": int(checkpoint["epoch"]), "estimator": config.estimator.name,
               "rates": rates, "batches": batches, "gaps": {}}
    for sign in (1.0, -1.0):
        phases = dataclasses.replace(run.estimator.phases, beta=sign * abs(config.dynamics.beta))
        estimator = kind(phases)
        gaps: dict[float, list[float]] = {factor: [] for factor in factors}
        for index, (x, y) in enumerate(run.train_loader):
            if index == batches:
                break
            limit = estimator.estimate(run.model, x, y, lr=0.0).direction
            for factor in factors:
                moved = estimator.estimate(run.model, x, y, lr=[factor * r for r in rates]).direction
                gaps[factor].append(gap(moved, limit))
        results["gaps"]["+β" if sign > 0 else "-β"] = {
            str(factor): {"median": statistics.median(values), "max": max(values)} for factor, values in gaps.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a run folder (its checkpoint.pt) or a checkpoint file")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--factors", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                        help="the run's learning rates are multiplied by each")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = measure(args.folder, args.data_dir, args.batches, args.factors)
    print(f"{results['folder']} (epoch {results['epoch']}, {results['estimator']}), {args.batches} training batches:")
    print("| β | rates x | gap: median | gap: max |")
    print("| --- | --- | --- | --- |")
    for sign, by_factor in results["gaps"].items():
        for factor, values in by_factor.items():
            print(f"| {sign} | {factor} | {values['median']:.3f} | {values['max']:.3f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
