"""``train.cpu_kernels: auto``, ``train.threads: auto``, ``train.cpu_kernel_threads: auto``: how a
run uses the CPU.

Measured side by side on a 2-core machine (benchmarks/RESULTS.md, "CPU
defaults"): threads must not outnumber the cores other processes leave idle.
Beside one busy process, a Laborieux MNIST epoch took 8.8 s in eqprop's C
kernel on both cores and 4.4 s on one (31.7 s in PyTorch on both); a small
ConvNet's epoch 12.4 s in PyTorch on both cores and 7.4 s on one. On the idle
machine both cores were the faster setting for both (2.8 s and 3.9 s, against
4.5 s and 7.4 s on one). PyTorch was slower than the kernel on the MNIST
network, idle or loaded. Hence:

- the kernel's threads (``cpu_kernel_threads: auto``) follow the cores other
  processes leave idle (:func:`~eqprop.cpu_kernels.runner.idle_cores`), measured
  before every epoch: its results do not depend on the count;
- PyTorch's threads (``threads: auto``) are 1 beside the kernel (whose own threads
  do the work; two pools spinning on the same cores slow each other down), else
  the idle cores at the start, fixed for the run (PyTorch's reductions may round
  differently with another count);
- where the kernel can run the model, ``cpu_kernels: auto`` times a few training
  steps of the run's own model and batch size (at most :data:`TIMED_BATCH`) in the kernel and in PyTorch, in
  alternation, and keeps the kernel unless PyTorch is clearly (10%) faster.
  Models the kernel does not run (ConvNets, a user's Φ) use PyTorch untimed.

The choice is written into the run's configuration (``config.yaml``, the
checkpoint: ``--resume`` continues with it) and printed in one line. Two fresh
runs of one configuration can choose differently (another load, timings within
the noise) and then differ by float rounding: pin ``train.cpu_kernels`` and
``train.threads`` for runs that must compute the same way everywhere
(``--config RUN/config.yaml`` reruns a run's own choice).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import RunConfig

#: rounds of timing, each setting once per round in turn
ROUNDS = 5
#: each timed measurement lasts at least this long (several training steps of a small model)
MIN_SECONDS = 0.05
#: the most samples a timed step takes: beyond a few hundred both settings cost the same per
#: sample, so a larger batch (a full-batch run's 60,000) is timed at this size, in a second, not
#: at the cost of a dozen epochs
TIMED_BATCH = 512
#: PyTorch replaces the kernel only when it is faster by more than this fraction: differences
#: within the timing's noise do not flip the choice from run to run
MARGIN = 0.1


@dataclass(frozen=True)
class CpuSetting:
    """A way to run the phases on the CPU: in the C kernel or not, and PyTorch's threads."""

    kernel: bool
    torch_threads: int | None   # None: torch's default

    def describe(self, config: RunConfig) -> str:
        if not self.kernel:
            threads = self.torch_threads or torch.get_num_threads()
            return f"PyTorch on {threads} thread{'s' * (threads > 1)}"
        threads = config.train.cpu_kernel_threads
        return "the C kernel" + (" on the idle cores" if threads == "auto" else
                                 " on every core" if threads is None else f" on {threads} threads")

    def apply(self, config: RunConfig) -> RunConfig:
        """``config`` with this setting written in (``cpu_kernel_threads`` kept as it is)."""
        train = config.train.model_copy(update={"cpu_kernels": self.kernel, "threads": self.torch_threads})
        return config.model_copy(update={"train": train})


def needs_choice(config: RunConfig) -> bool:
    """True when ``train.cpu_kernels`` or ``train.threads`` is ``auto``."""
    return config.train.cpu_kernels == "auto" or config.train.threads == "auto"


def settings(config: RunConfig, idle: int, kernel_runs_model: bool) -> list[CpuSetting]:
    """The settings to choose among, the kernel's first; ``idle``: the cores other processes leave
    idle now."""
    t = config.train
    kernel = (t.cpu_kernels is not False) and kernel_runs_model
    pytorch = t.cpu_kernels is not True or not kernel_runs_model
    options = []
    if kernel:
        options.append(CpuSetting(True, 1 if t.threads == "auto" else t.threads))
    if pytorch:
        options.append(CpuSetting(False, idle if t.threads == "auto" else t.threads))
    return options


def choose(options: list[CpuSetting],
           time_step: Callable[[CpuSetting], Callable[[], object]]) -> tuple[CpuSetting, dict[CpuSetting, float]]:
    """The setting to use, and each one's median seconds per step: the first of ``options`` unless
    another is faster by more than :data:`MARGIN`. ``time_step(setting)`` prepares a run under
    ``setting`` and returns one training step of it; each is run once to warm up (the kernel is
    compiled on first use), then timed in alternation for :data:`ROUNDS` rounds."""
    steps = {}
    default_threads = torch.get_num_threads()
    for setting in options:
        torch.set_num_threads(setting.torch_threads or default_threads)
        steps[setting] = time_step(setting)
        steps[setting]()
    times: dict[CpuSetting, list[float]] = {setting: [] for setting in options}
    for _ in range(ROUNDS):
        for setting, step in steps.items():
            torch.set_num_threads(setting.torch_threads or default_threads)
            count, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < MIN_SECONDS or count == 0:
                step()
                count += 1
            times[setting].append(elapsed / count)
    medians = {setting: statistics.median(values) for setting, values in times.items()}
    fastest = min(medians, key=medians.__getitem__)
    first = options[0]
    return (first if medians[first] <= (1 + MARGIN) * medians[fastest] else fastest), medians
