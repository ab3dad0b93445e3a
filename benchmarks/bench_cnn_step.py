"""Time one training step of the paper's CIFAR-10 P-CNN: symmetric EP and BPTT.

Network (Laborieux et al. 2021): input 3x32x32, conv 3x3 channels 128-256-512-512,
stride 1, padding 1,1,1,0, each followed by 2x2 max-pool, softmax readout (CE)
from the flattened 512 features, clamp(x/2, 0, 1); batch 128, T1 = 250, T2 = 25.

- symmetric EP step: clamp, T1 free steps, two nudged phases of T2 steps (+β, -β,
  both from s*), then the parameter gradients G at s^{+β} and s^{-β} (``fill_grads``).
- BPTT step: estimator "bptt" with K = T2: T1 - K steps without graph, K steps
  with graph, loss at s_T1, backward (``fill_grads``).

FLOPs are counted analytically (1 MAC = 2 FLOPs), counting only the
convolutions, transposed convolutions and matrix products; pooling, unpooling,
activations and other element-wise work are not counted. With M_n the MACs of
conv layer n on the batch (C_out·H_conv·W_conv·C_in·k², before pooling):

- clamp: M_1 (the first layer's drive, once per batch);
- one dynamics step: M_n (forward conv) + M_n (transposed conv of the unpooled
  upper state, counted dense over the unpooled map, as the libraries compute
  it) for every conv layer n >= 2, plus 2·in·out per fc layer in the dynamics;
  a nudged step adds 2·F·classes for the readout's logits and nudge;
- one G evaluation: M_n (conv to get the pooling indices, n >= 2) + M_n (weight
  gradient, every n) + in·out per fc layer + 2·F·classes for the readout;
- BPTT: T1 forward steps + the backward of the last K steps, counted as twice a
  forward step (gradients w.r.t. the input and the weight of every conv and
  transposed conv), plus two clamps, the first layer's weight gradient M_1 and
  3·F·classes for the loss and its gradients.

Usage: ``PYTHONPATH=src python benchmarks/bench_cnn_step.py [--device cuda] [--json out.json]``;
``--small`` for a quick CPU check with reduced channels, batch and T. On CUDA,
``--tf32 off`` times full float32 (the library's default is TF32 on), ``--bf16``
runs the steps under bfloat16 autocast, ``--cuda-graphs`` replays the phases
as CUDA graphs (:class:`eqprop.cuda_graphs.PhaseGraphs`; BPTT's recorded steps
stay eager).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eqprop.cuda_graphs import PhaseGraphs
from eqprop.estimators import Phases, build_estimator
from eqprop.models.cnn import PCNN
from eqprop.solvers import build_solver

PAPER = dict(channels=[128, 256, 512, 512], batch=128, t1=250, t2=25)
SMALL = dict(channels=[16, 32, 64, 64], batch=16, t1=20, t2=5)


@dataclass
class Counts:
    clamp: int        # MACs
    step: int         # MACs of a free step
    nudge: int        # extra MACs of a nudged step
    grads: int        # MACs of one G evaluation
    first_grad: int   # MACs of the first layer's weight gradient (BPTT backward)
    readout: int      # MACs of one readout matmul (F x classes on the batch)


def count_macs(model: PCNN, batch: int) -> Counts:
    conv = []
    c_in = model.input_shape[0]
    for (c_out, h, w), k in zip(model.conv_shapes, model.kernels):
        conv.append(batch * c_out * h * w * c_in * k * k)
        c_in = c_out
    fc = [batch * layer.in_features * layer.out_features for layer in model.fcs]
    readout = 0
    if hasattr(model.head, "linear"):
        readout = batch * model.head.linear.in_features * model.head.linear.out_features
    return Counts(clamp=conv[0], step=2 * sum(conv[1:]) + 2 * sum(fc), nudge=2 * readout,
                  grads=sum(conv[1:]) + sum(conv) + sum(fc) + 2 * readout, first_grad=conv[0],
                  readout=readout)


def flops_symmetric(c: Counts, t1: int, t2: int) -> int:
    macs = c.clamp + (t1 + 2 * t2) * c.step + 2 * t2 * c.nudge + 2 * c.grads
    return 2 * macs


def flops_bptt(c: Counts, t1: int, k: int) -> int:
    # loss: logits, then their gradients w.r.t. the readout weight and its input
    macs = 2 * c.clamp + t1 * c.step + k * 2 * c.step + c.first_grad + 3 * c.readout
    return 2 * macs


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()                    # warm-up (kernel selection, allocator)
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--t1", type=int, default=None)
    parser.add_argument("--t2", type=int, default=None)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--small", action="store_true",
                        help="channels 16-32-64-64, batch 16, T1 20, T2 5 (unless given)")
    parser.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                        help="channels-last weights and states (auto: on for CPU, where NCHW pooling is slow)")
    parser.add_argument("--tf32", choices=["on", "off"], default="on", help="CUDA: TF32 matmuls and convolutions")
    parser.add_argument("--bf16", action="store_true", help="run the steps under bfloat16 autocast")
    parser.add_argument("--cuda-graphs", action="store_true", help="replay the phases as CUDA graphs")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    preset = SMALL if args.small else PAPER
    batch = args.batch or preset["batch"]
    t1 = args.t1 or preset["t1"]
    t2 = args.t2 or preset["t2"]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)

    g = torch.Generator().manual_seed(0)
    model = PCNN((3, 32, 32), preset["channels"], [3] * 4, [1] * 4, [1, 1, 1, 0], [10],
                 activation="half_hard_sigmoid", loss="ce", generator=g).to(device)
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cpu")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = (torch.rand(batch, 3, 32, 32, generator=g) - 0.5).div_(0.6).to(device)
    target = F.one_hot(torch.randint(0, 10, (batch,), generator=g), 10).float().to(device)

    counts = count_macs(model, batch)
    results = {
        "config": dict(channels=preset["channels"], batch=batch, t1=t1, t2=t2, beta=args.beta,
                       dtype="bf16-autocast" if args.bf16 else "float32",
                       tf32=args.tf32 == "on" and device.type == "cuda", cuda_graphs=args.cuda_graphs,
                       device=str(device), threads=torch.get_num_threads(),
                       channels_last=channels_last,
                       torch=torch.__version__, machine=platform.processor() or platform.machine(),
                       gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None),
        "macs_per_dynamics_step": counts.step,
    }
    solver = build_solver("fixed", PhaseGraphs() if args.cuda_graphs else None)
    runs = {
        "symmetric_ep": (build_estimator("symmetric", Phases(t1, t2, args.beta, solver)),
                         flops_symmetric(counts, t1, t2), t1 + 2 * t2),
        "bptt": (build_estimator("bptt", Phases(t1, t2, args.beta, solver)), flops_bptt(counts, t1, t2), t1),
    }
    print(f"P-CNN {'-'.join(map(str, preset['channels']))}, batch {batch}, T1={t1}, T2={t2}, "
          f"device {device}, threads {torch.get_num_threads()}, channels_last {channels_last}, "
          f"tf32 {results['config']['tf32']}, bf16 {args.bf16}, cuda graphs {args.cuda_graphs}")
    for name, (estimator, flops, steps) in runs.items():
        def step() -> None:
            with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                estimator.fill_grads(model, x, target)
        times = timed(step, device, args.repeats)
        best, median = min(times), statistics.median(times)
        results[name] = dict(times_s=times, median_s=median, min_s=best, flops=flops,
                             flops_per_s=flops / median, dynamics_steps=steps,
                             ms_per_dynamics_step=1e3 * median / steps)
        print(f"{name:>13}: median {median:8.3f} s (min {best:.3f}) over {len(times)} | "
              f"{flops / 1e12:8.3f} TFLOP | {flops / median / 1e9:9.1f} GFLOP/s | "
              f"{1e3 * median / steps:7.2f} ms per dynamics step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
