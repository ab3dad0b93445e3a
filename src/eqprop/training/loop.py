"""One epoch of training and one pass of evaluation.

Statistics are accumulated on the device and read back only when the progress
bar is refreshed and at the end of the epoch, so the phase loops never wait for
the host. A non-finite loss (NaN or inf states: a non-finite estimate reaches
the weights, then the next batch's states) or non-finite weights at the end
of the epoch raise :class:`DivergenceError` at the next read-back, before any
checkpoint is written. The logged training loss and error are those of each
batch's free state, read through the head after the batch's update (for a
softmax readout, the readout has moved by one step).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..data import BatchLoader
from ..estimators import Estimator
from ..gdu import gradient_angle
from ..models import EnergyModel
from ..solvers import Solver, SolverStats, WarmStart, build_solver


class DivergenceError(RuntimeError):
    """Training produced NaN or inf; the message says where."""


@dataclass
class EpochStats:
    """Mean loss and error rate over an epoch, and its speed."""

    loss: float
    error: float
    seconds: float
    samples: int
    gradient_angles: list[list[float]] = field(default_factory=list)
    #: how the phases were solved: ``free_steps``, ``nudged_steps`` (mean per phase), their
    #: ``_max``, the mean final residuals, ... (:meth:`SolverTotals.summary`)
    solver: dict[str, float] = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


class _Totals:
    """Running sums kept on the device: loss, errors, and a finiteness flag.

    Each batch's per-sample losses and mistakes are kept as they are and summed
    together when read (every ``refresh_every`` batches): a batch then costs two
    small ops here instead of six (0.20 → 0.16 ms per batch of the Laborieux
    MNIST preset on the development CPU).
    """

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.errors = torch.zeros((), dtype=torch.int64, device=device)
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.samples = 0
        self._losses: list[torch.Tensor] = []
        self._mistakes: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, loss: torch.Tensor, y: torch.Tensor) -> None:
        # the mistakes now: logits may be a state buffer that the next batch overwrites
        self._mistakes.append(logits.argmax(dim=1) != y)
        self._losses.append(loss)
        self.samples += y.shape[0]

    def read(self) -> tuple[float, float, bool]:
        """Host copies of mean loss, error rate and finiteness (one synchronisation)."""
        if self._losses:
            losses = torch.cat(self._losses)
            self.loss += losses.sum(dtype=torch.float64)
            self.errors += torch.cat(self._mistakes).sum()
            self.finite &= torch.isfinite(losses).all()
            self._losses.clear()
            self._mistakes.clear()
        loss, errors, finite = self.loss.item(), self.errors.item(), bool(self.finite.item())
        n = max(self.samples, 1)
        return loss / n, errors / n, finite


class SolverTotals:
    """Steps and residuals of one kind of phase over an epoch. Steps are host integers; the
    residuals are summed on the device and read once, at :meth:`summary`."""

    def __init__(self, device: torch.device) -> None:
        self.phases = 0
        self.steps = 0
        self.max_steps = 0
        self.capped = 0      # phases that stopped at the cap without meeting the tolerance
        self.measured = 0    # residuals summed
        self.residual = torch.zeros((), dtype=torch.float64, device=device)
        self.fallbacks = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, stats: SolverStats | None) -> None:
        if stats is None:
            return
        self.phases += 1
        self.steps += stats.steps
        self.max_steps = max(self.max_steps, stats.steps)
        self.capped += stats.converged is False
        if stats.residual is not None:
            self.residual += stats.residual.sum(dtype=torch.float64)
            self.measured += stats.residual.numel()
        if isinstance(stats.fallbacks, torch.Tensor):
            self.fallbacks += stats.fallbacks

    def summary(self, prefix: str) -> dict[str, float]:
        """``{prefix}_steps`` (mean per phase), ``_steps_max``, ``_residual`` (mean final residual per
        sample), ``_capped`` (fraction of phases that hit the cap short of the tolerance),
        ``_fallbacks`` (Anderson's plain steps); empty if no phase ran."""
        if not self.phases:
            return {}
        summary = {f"{prefix}_steps": self.steps / self.phases, f"{prefix}_steps_max": self.max_steps,
                   f"{prefix}_capped": self.capped / self.phases, f"{prefix}_fallbacks": int(self.fallbacks.item())}
        if self.measured:
            summary[f"{prefix}_residual"] = self.residual.item() / self.measured
        return summary


def one_hot_rows(classes: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ``[classes, classes]`` identity: row y is label y's one-hot target. Indexing it is
    several times faster than ``F.one_hot(...).to(dtype)``, which also checks the labels' range
    (the datasets' labels were checked when loaded)."""
    return torch.eye(classes, dtype=dtype, device=device)


def train_epoch(model: EnergyModel, estimator: Estimator, optimizer: torch.optim.Optimizer,
                loader: BatchLoader, epoch: int, refresh_every: int = 50,
                show_progress: bool = False, angle_every: int | None = None,
                angle_bptt_steps: int | str | None = None, bf16_autocast: bool = False,
                warm_start: WarmStart | None = None) -> EpochStats:
    """Estimate, check and apply the gradient of every batch of ``loader`` once.

    With ``warm_start``, each sample's free phase starts from its steady state of
    the last epoch, and this epoch's steady states are kept for the next.

    With ``angle_every``, every that many batches the angle between the
    estimate and BPTT's gradient on the batch (before the update) is measured
    and kept in :attr:`EpochStats.gradient_angles` as ``[batch, degrees]``.
    """
    model.train()
    totals = _Totals(loader.device)
    free_totals, nudged_totals = SolverTotals(loader.device), SolverTotals(loader.device)
    params = model.trainable_parameters()
    angles: list[list[float]] = []
    targets = one_hot_rows(model.head.classes, loader.dtype, loader.device)
    start = time.perf_counter()
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}", unit="batch", leave=False,
               disable=not show_progress, dynamic_ncols=True)
    with bar:
        batches = loader.with_indices() if warm_start is not None else ((x, y, None) for x, y in loader)
        for i, (x, y, indices) in enumerate(batches, start=1):
            target = targets[y]
            if angle_every and (i - 1) % angle_every == 0:
                angles.append([i, gradient_angle(model, estimator, x, target, angle_bptt_steps)])
            initial = warm_start.start(model, x, indices) if warm_start is not None else None
            with torch.autocast(loader.device.type, torch.bfloat16, enabled=bf16_autocast):
                # the start only where there is one: an estimator of a user may not take it
                result = estimator.train_step(model, x, target, optimizer,
                                              **({} if initial is None else {"start": initial}))
            if warm_start is not None:
                warm_start.keep(indices, result.free_state)
            free_totals.add(result.free_stats)
            nudged_totals.add(result.nudged_stats)
            with torch.no_grad():
                free = [s.to(x.dtype) for s in result.free_state]
                totals.add(model.logits(free), model.head.loss(free[-1], target), y)
            bar.update()
            if i % refresh_every == 0 or i == len(loader):
                loss, error, finite = _checked(totals, epoch, i)
                if show_progress:
                    elapsed = time.perf_counter() - start
                    steps = {name: f"{t.steps / t.phases:.1f}" for name, t in
                             (("free", free_totals), ("nudged", nudged_totals)) if t.phases}
                    bar.set_postfix(loss=f"{loss:.4f}", err=f"{100 * error:.2f}%",
                                    speed=f"{totals.samples / elapsed:.0f}/s", **steps)
    seconds = time.perf_counter() - start
    totals.finite &= torch.isfinite(torch.stack([p.sum() for p in params])).all()  # NaN/inf propagate
    loss, error, _ = _checked(totals, epoch, len(loader))
    solver = {**free_totals.summary("free"), **nudged_totals.summary("nudged")}
    return EpochStats(loss, error, seconds, totals.samples, angles, solver)


def _checked(totals: _Totals, epoch: int, batch: int) -> tuple[float, float, bool]:
    loss, error, finite = totals.read()
    if not finite:
        raise DivergenceError(f"training diverged in epoch {epoch} (NaN or inf by batch {batch})")
    return loss, error, finite


@torch.no_grad()
def evaluate(model: EnergyModel, loader: BatchLoader, solver: Solver | None = None,
             t1: int = 30) -> tuple[float, float, dict[str, float]]:
    """Mean loss and error rate of the free steady state over ``loader``, and how it was solved
    (``free_steps`` and the rest of :meth:`SolverTotals.summary`). The free phase runs ``solver``
    (None: the papers' fixed steps) with at most ``t1`` steps."""
    model.eval()
    solver = solver if solver is not None else build_solver("fixed")
    totals = _Totals(loader.device)
    phases = SolverTotals(loader.device)
    targets = one_hot_rows(model.head.classes, loader.dtype, loader.device)
    for x, y in loader:
        target = targets[y]
        clamped = model.clamp(x)
        state, stats = solver(model, clamped, model.init_state(x), t1)
        phases.add(stats)
        totals.add(model.logits(state), model.head.loss(state[-1], target), y)
    loss, error, finite = totals.read()
    if not finite:
        raise DivergenceError("evaluation produced NaN or inf: the weights have diverged")
    return loss, error, phases.summary("free")
