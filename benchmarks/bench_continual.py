"""Training-step time of continual EP (c_ep, c_vf) next to one-sided EP, on a fully connected model.

Times :meth:`train_step` of each estimator on random batches (default: the
C-EP paper's EP-1h network 784-512-10, squared error with the nudge outside σ,
batch 20, T1 40, K 15, float32), taking the best of several repeats (robust on
a noisy shared machine). ``c_ep (per step)`` forces the generic per-step path
(the first layer's outer product, update and re-clamp at every nudged step)
instead of the telescoped first layer of fully connected models.

    python benchmarks/bench_continual.py --threads 1 --repeats 7
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from eqprop.estimators import Phases, build_estimator
from eqprop.models import PMLP
from eqprop.models.vf import VFMLP


def time_train_step(make_model, name: str, phases: Phases, x, target, lrs, steps: int, repeats: int,
                    per_step: bool = False) -> float:
    """Best over ``repeats`` of the mean seconds per train_step over ``steps`` steps."""
    model = make_model()
    estimator = build_estimator(name, phases, torch.Generator().manual_seed(0))
    if per_step:
        estimator.telescope_first_layer = False
    optimizer = torch.optim.SGD([{"params": g, "lr": lr} for g, lr in zip(model.layer_parameters(), lrs)],
                                lr=lrs[0])
    for _ in range(2):
        estimator.train_step(model, x, target, optimizer)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            estimator.train_step(model, x, target, optimizer)
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[784, 512, 10])
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--t1", type=int, default=40)
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="train steps per repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--estimators", nargs="+", default=["one_sided", "c_ep", "c_ep/per_step", "c_vf"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, args.sizes[0], generator=g)
    target = F.one_hot(torch.randint(0, args.sizes[-1], (args.batch,), generator=g), args.sizes[-1]).float()
    phases = Phases(args.t1, args.k, args.beta)
    layers = len(args.sizes) - 1
    ep_lrs = [0.08 / 2 ** n for n in range(layers)]
    c_lrs = [lr / 20 for lr in ep_lrs]     # C-EP's rates are ~20x smaller than EP's (SPEC §4)

    def pmlp():
        return PMLP(args.sizes, loss="mse", nudge_inside=False, generator=torch.Generator().manual_seed(0))

    def vfmlp():
        return VFMLP(args.sizes, loss="mse", nudge_inside=False, generator=torch.Generator().manual_seed(0))

    print(f"torch {torch.__version__}, {args.threads} thread(s), sizes {args.sizes}, batch {args.batch}, "
          f"T1 {args.t1}, K {args.k}; best of {args.repeats} x {args.steps} steps")
    for spec in args.estimators:
        name, _, variant = spec.partition("/")
        make = vfmlp if name == "c_vf" else pmlp
        lrs = ep_lrs if name in ("one_sided", "symmetric", "random_sign") else c_lrs
        seconds = time_train_step(make, name, phases, x, target, lrs, args.steps, args.repeats,
                                  per_step=variant == "per_step")
        print(f"{spec:<16}{seconds * 1e3:9.2f} ms/step")


if __name__ == "__main__":
    main()
