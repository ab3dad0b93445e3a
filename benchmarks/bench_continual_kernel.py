"""Continual EP's and VF's nudged phase: eqprop's C kernel against the PyTorch loop, and a free phase.

Times :func:`~eqprop.estimators.continual.telescoped_first_layer` (K nudged steps, the weights
moving at every step) on one batch, with the C kernel (``eqprop_continual_phase``) and with it
turned off (the PyTorch loop), and a free phase of T1 steps in the kernel for scale; the three
alternate, and each figure is the best of ``--repeats`` rounds (robust on a shared machine).
Defaults: the C-EP paper's 2h network (784-512-512-10), batch 20, K 20, T1 100, one thread.

    python benchmarks/bench_continual_kernel.py --json benchmarks/results/cpu/continual_kernel.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from eqprop.cpu_kernels import KernelPhases, KernelProducts, load_kernel
from eqprop.cpu_kernels import continual as kernel_continual
from eqprop.estimators import continual
from eqprop.models import PMLP
from eqprop.models.vf import VFMLP


def seconds_per_call(run, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[784, 512, 512, 10])
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--t1", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=5, help="phases per timed round")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, args.sizes[0], generator=g)
    target = F.one_hot(torch.randint(0, args.sizes[-1], (args.batch,), generator=g), args.sizes[-1]).float()
    free_runner = KernelPhases(args.threads)
    results = {}
    print(f"sizes {args.sizes}, batch {args.batch}, K {args.k}, T1 {args.t1}, {args.threads} thread(s); "
          f"best of {args.repeats} rounds of {args.calls} phases")
    for rule, make in (("ep", PMLP), ("vf", VFMLP)):
        model = make(args.sizes, "scaled_sigmoid", "mse", False, generator=torch.Generator().manual_seed(0))
        model.products = KernelProducts(load_kernel, args.threads)
        lrs = [1e-4] * len(model.trainable_parameters())   # small: the weights barely move between rounds
        with torch.no_grad():
            clamped = model.clamp(x)
            free = free_runner(model, clamped, model.init_state(x), args.t1)
            best = {"kernel": float("inf"), "pytorch": float("inf"), "free phase (kernel)": float("inf")}
            for _ in range(args.repeats):
                for name, steps in (("kernel", kernel_continual.continual_steps), ("pytorch", lambda *a: None)):
                    continual.continual_steps = steps
                    best[name] = min(best[name], seconds_per_call(
                        lambda: continual.telescoped_first_layer(model, clamped, free, 0.5, target, args.k, lrs,
                                                                 rule, None), args.calls))
                best["free phase (kernel)"] = min(best["free phase (kernel)"], seconds_per_call(
                    lambda: free_runner(model, clamped, model.init_state(x), args.t1), args.calls))
            continual.continual_steps = kernel_continual.continual_steps
        name = "c_ep" if rule == "ep" else "c_vf"
        results[name] = {key: 1000 * value for key, value in best.items()}
        print(f"{name}: nudged phase {results[name]['kernel']:.2f} ms in the kernel, "
              f"{results[name]['pytorch']:.2f} ms in PyTorch ({results[name]['pytorch'] / results[name]['kernel']:.2f}x); "
              f"free phase {results[name]['free phase (kernel)']:.2f} ms")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"settings": vars(args), "torch": torch.__version__, "processor": platform.processor(),
                       "milliseconds": results}, out, indent=1)
            out.write("\n")


if __name__ == "__main__":
    main()
