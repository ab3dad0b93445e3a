"""An estimator of your own, registered by name: here the mean of the two one-sided estimates
at +β and -β taken from the same free state, each nudged phase run on its own (symmetric EP runs
them side by side and reads the same difference).

    python examples/custom_estimator.py [--quick]

Registered from a plugin module, it is also ``estimator.name: two_sided_mean`` in a config.
"""
import argparse

import torch

from eqprop import Estimate, Estimator, PMLP, Phases, build_estimator, register
from eqprop.estimators.base import ep_difference


@register("two_sided_mean")
class TwoSidedMean(Estimator):
    @torch.no_grad()  # the phases need no autograd graph: EP's estimate comes from the states
    def estimate(self, model, x, target, start=None):
        clamped = model.clamp(x)
        free, free_stats = self.free_phase(model, clamped, start)
        beta = self.phases.beta
        plus, _ = self.nudged_phase(model, clamped, free, beta, target)
        minus, nudged_stats = self.nudged_phase(model, clamped, free, -beta, target)
        direction = ep_difference(model, clamped, target, (minus, -beta), (plus, beta))
        return Estimate(direction, free, free_stats, nudged_stats)


if __name__ == "__main__":
    from eqprop.data import load_dataset
    from eqprop.training.loop import evaluate, train_epoch
    from torch.utils.data import DataLoader, TensorDataset

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    train = load_dataset("mnist-demo", "train")
    size = 200 if args.quick else 3000
    loader = DataLoader(TensorDataset(train.x[:size], train.y[:size]), batch_size=50, shuffle=True)
    model = PMLP([784, 128, 10], activation="scaled_sigmoid")
    phases = Phases(t1=30, t2=10, beta=0.2)
    mine, symmetric = build_estimator("two_sided_mean", phases), build_estimator("symmetric", phases)
    x, y = next(iter(loader))
    a, b = mine.estimate(model, x.float() / 255, y), symmetric.estimate(model, x.float() / 255, y)
    gap = max(float((p - q).abs().max()) for p, q in zip(a.direction, b.direction))
    print(f"largest difference from symmetric EP on one batch: {gap:.2e}")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    stats = train_epoch(model, mine, optimizer, loader, 1)
    print(f"one epoch with two_sided_mean: train error {100 * stats.error:.1f}%, test error "
          f"{100 * evaluate(model, [(x.float() / 255, y)], t1=30)[1]:.1f}% on one batch")
