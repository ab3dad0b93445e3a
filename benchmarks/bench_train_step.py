"""Training-step throughput of each preset: its EP estimator next to BPTT, on one device.

For every preset (or those named), builds the preset's model and estimator,
and times full training steps (estimate + optimizer step) on random batches of
the preset's batch size and input shape, then the same with the BPTT
estimator (K = T2, the authors' truncation). Prints samples per second and
writes JSON.

    python benchmarks/bench_train_step.py --presets laborieux-mnist ep-1h --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch
import torch.nn.functional as F

from eqprop import build
from eqprop.config import RunConfig, validate_config
from eqprop.estimators import estimator_class
from eqprop.backends import CpuKernelBackend
from eqprop.presets import load_preset, preset_names


def time_steps(config: RunConfig, estimator_name: str, device: torch.device, steps: int, warmup: int,
               compile_phases: bool = False, cuda_graphs: bool = False, repeats: int = 1,
               cpu_kernels: bool = False, kernel_threads: int | None = None) -> float:
    """Seconds per training step of ``config`` with the estimator ``estimator_name``: the fastest
    of ``repeats`` timed blocks of ``steps`` steps (on a shared or virtual machine, the minimum
    is the least disturbed by other work and stolen CPU time)."""
    data = config.model_dump(mode="json")
    # the preset's estimator options that the timed estimator has not (BPTT beside C-VF's random
    # sign) are dropped: the configuration refuses them
    kept = estimator_class(estimator_name).config_fields
    data["estimator"] = {"name": estimator_name,
                         **{key: value for key, value in data["estimator"].items() if key in kept}}
    data["train"].update(compile=compile_phases, cuda_graphs=cuda_graphs, cpu_kernels=cpu_kernels,
                         cpu_kernel_threads=kernel_threads)
    data["train"].update(device=device.type, threads=torch.get_num_threads())
    config = validate_config(data)  # a bad --kernel-threads is refused as in training
    dtype = build.DTYPES[config.train.dtype]
    run = build.build_run(config, with_data=False)  # model, backend, solvers, optimizer as training builds them
    model, estimator, optimizer = run.model, run.estimator, run.optimizer
    if isinstance(run.backend, CpuKernelBackend) and run.backend.phases.unavailable:
        raise SystemExit(f"the C kernel is unavailable: {run.backend.phases.unavailable}")
    shape = input_shape(config)
    g = torch.Generator().manual_seed(1)
    batch = config.train.batch_size
    x = torch.rand(batch, *shape, generator=g).to(device=device, dtype=dtype)
    y = torch.randint(0, model.head.classes, (batch,), generator=g).to(device)
    target = F.one_hot(y, model.head.classes).to(dtype)

    def step() -> None:
        estimator.train_step(model, x, target, optimizer)

    for _ in range(warmup):
        step()
    sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def input_shape(config: RunConfig) -> list[int]:
    if config.model.kind == "mlp":
        return [config.model.sizes[0]]
    return list(config.model.input_shape)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", help="presets to time (default: all fully connected ones)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=100, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed blocks of --steps steps per measurement; the fastest is reported")
    parser.add_argument("--compile", action="store_true", help="torch.compile the EP estimator's phases "
                                                                "(timed after the warm-up, which compiles)")
    parser.add_argument("--cuda-graphs", action="store_true", help="CUDA: replay every phase as a CUDA graph "
                                                                    "(BPTT's recorded steps stay eager)")
    parser.add_argument("--cpu-kernels", action="store_true", help="CPU: run the phases of fully connected "
                                                                    "models in eqprop's C kernel")
    parser.add_argument("--kernel-threads", type=int, help="threads of the C kernel (default: every core)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = build.resolve_device(args.device)
    names = args.presets or [n for n in preset_names() if load_preset(n)["model"].get("kind", "mlp") == "mlp"]
    results = []
    print(f"device {device}, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"{'preset':<20}{'estimator':<13}{'batch':>6}{'ms/step':>10}{'samples/s':>11}{'BPTT ms/step':>14}{'BPTT samples/s':>16}")
    for name in names:
        config = validate_config(load_preset(name))
        steps = args.steps if config.model.kind == "mlp" else max(1, args.steps // 20)
        ep = time_steps(config, config.estimator.name, device, steps, args.warmup, args.compile, args.cuda_graphs,
                        args.repeats, args.cpu_kernels, args.kernel_threads)
        bptt = time_steps(config, "bptt", device, steps, args.warmup, cuda_graphs=args.cuda_graphs,
                          repeats=args.repeats, cpu_kernels=args.cpu_kernels, kernel_threads=args.kernel_threads)
        batch = config.train.batch_size
        row = {"preset": name, "estimator": config.estimator.name, "compiled": args.compile,
               "cuda_graphs": args.cuda_graphs, "cpu_kernels": args.cpu_kernels,
               "kernel_threads": args.kernel_threads, "batch_size": batch,
               "t1": config.dynamics.t1, "t2": config.dynamics.t2,
               "ep_seconds_per_step": ep, "ep_samples_per_second": batch / ep,
               "bptt_seconds_per_step": bptt, "bptt_samples_per_second": batch / bptt,
               "epoch_seconds_60k_estimate": math.ceil(60000 / batch) * ep}
        results.append(row)
        print(f"{name:<20}{config.estimator.name:<13}{batch:>6}{1e3 * ep:>10.2f}{batch / ep:>11.0f}"
              f"{1e3 * bptt:>14.2f}{batch / bptt:>16.0f}")
    if args.json:
        meta = {"device": str(device), "threads": args.threads, "torch": torch.__version__,
                "machine": platform.machine(), "processor": platform.processor(), "steps": args.steps,
                "repeats": args.repeats}
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
