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
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..data import BatchLoader
from ..distributed import WORLD, World
from ..estimators import Estimate, Estimator
from ..gdu import gradient_angle
from ..models import EnergyModel
from ..solvers import Solver, SolverStats, WarmStart, build_solver
from ..targets import one_hot_targets


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

    def __init__(self, device: torch.device, world: World = WORLD) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.errors = torch.zeros((), dtype=torch.int64, device=device)
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.samples = 0
        self.world = world
        self._losses: list[torch.Tensor] = []
        self._mistakes: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, loss: torch.Tensor, y: torch.Tensor) -> None:
        # the mistakes now: logits may be a state buffer that the next batch overwrites
        self._mistakes.append(logits.argmax(dim=1) != y)
        self._losses.append(loss)
        self.samples += y.shape[0]

    def read(self) -> tuple[float, float, bool]:
        """Host copies of mean loss, error rate and finiteness (one synchronisation), over every
        rank of a distributed run (one all-reduce: every rank reads at the same batches)."""
        if self._losses:
            losses = torch.cat(self._losses)
            self.loss += losses.sum(dtype=torch.float64)
            self.errors += torch.cat(self._mistakes).sum()
            self.finite &= torch.isfinite(losses).all()
            self._losses.clear()
            self._mistakes.clear()
        sums = torch.stack([self.loss, self.errors.double(), torch.tensor(float(self.samples), dtype=torch.float64,
                                                                          device=self.loss.device),
                            (~self.finite).double()])
        loss, errors, samples, non_finite = self.world.sum_(sums).tolist()
        self.all_samples = int(samples)  # every rank's
        n = max(samples, 1)
        return loss / n, errors / n, non_finite == 0


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
        self.excluded: torch.Tensor | None = None   # samples left out of the updates, if counted

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
        if stats.excluded is not None:
            self.excluded = stats.excluded if self.excluded is None else self.excluded + stats.excluded

    def summary(self, prefix: str) -> dict[str, float]:
        """``{prefix}_steps`` (mean per phase), ``_steps_max``, ``_residual`` (mean final residual per
        sample), ``_capped`` (fraction of phases that hit the cap short of the tolerance),
        ``_fallbacks`` (Anderson's plain steps), ``_excluded`` (samples the estimator left out of
        the updates, where it counts them); empty if no phase ran."""
        if not self.phases:
            return {}
        summary = {f"{prefix}_steps": self.steps / self.phases, f"{prefix}_steps_max": self.max_steps,
                   f"{prefix}_capped": self.capped / self.phases, f"{prefix}_fallbacks": int(self.fallbacks.item())}
        if self.measured:
            summary[f"{prefix}_residual"] = self.residual.item() / self.measured
        if self.excluded is not None:
            summary[f"{prefix}_excluded"] = int(self.excluded.item())
        return summary


class _Batches:
    """The batches of a loader as ``(x, y, one-hot target, indices)`` on the model's device.

    An eqprop :class:`BatchLoader` already builds them there: its labels index the identity
    matrix (several times faster than ``F.one_hot(...).to(dtype)``, which checks the range: the
    datasets' labels were checked when loaded). Any other iterable of ``(x, y)`` (a DataLoader)
    is moved batch by batch, its ``y`` read as labels or one-hot rows
    (:func:`~eqprop.targets.one_hot_targets`); ``indices`` is None there.
    """

    def __init__(self, model: EnergyModel, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.loader = loader
        self.classes = model.head.classes
        if isinstance(loader, BatchLoader):
            self.device, self.dtype = loader.device, loader.dtype
        else:
            reference = next(iter(model.trainable_parameters()), None)
            self.device = reference.device if reference is not None else torch.device("cpu")
            self.dtype = reference.dtype if reference is not None else torch.get_default_dtype()
        self.count: int | None = len(loader) if isinstance(loader, Sized) else None

    def with_indices(self, indices: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                            torch.Tensor | None]]:
        if isinstance(self.loader, BatchLoader):
            rows = torch.eye(self.classes, dtype=self.dtype, device=self.device)
            batches = self.loader.with_indices() if indices else ((x, y, None) for x, y in self.loader)
            for x, y, index in batches:
                yield x, y, rows[y], index
            return
        for batch in self.loader:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError("a loader must yield (x, y) pairs of tensors, "
                                f"got a {type(batch).__name__}")
            x, y = (torch.as_tensor(t).to(self.device, non_blocking=True) for t in batch)
            x = x.to(self.dtype).div_(255) if x.dtype == torch.uint8 else x.to(self.dtype)  # as BatchLoader does
            target = one_hot_targets(y, self.classes, self.dtype)
            yield x, target.argmax(dim=1) if y.is_floating_point() else y, target, None


def train_epoch(model: EnergyModel, estimator: Estimator, optimizer: torch.optim.Optimizer,
                loader: Iterable[tuple[torch.Tensor, torch.Tensor]], epoch: int, refresh_every: int = 50,
                show_progress: bool = False, angle_every: int | None = None,
                angle_bptt_steps: int | str | None = None, bf16_autocast: bool = False,
                warm_start: WarmStart | None = None,
                on_batch: Sequence[Callable[[int, int, Estimate], None]] = ()) -> EpochStats:
    """Estimate, check and apply the gradient of every batch of ``loader`` once.

    ``loader``: eqprop's :class:`~eqprop.data.BatchLoader` (batches built on the device), or any
    iterable of ``(x, y)`` batches such as a ``torch.utils.data.DataLoader``: its batches are moved
    to the model's device and dtype, and ``y`` may be integer labels or one-hot rows.

    With ``warm_start`` (a BatchLoader only), each sample's free phase starts from its steady state of
    the last epoch, and this epoch's steady states are kept for the next.

    ``on_batch``: functions called as ``f(epoch, batch, estimate)`` after each batch's update.

    With ``angle_every``, every that many batches the angle between the
    estimate and BPTT's gradient on the batch (before the update) is measured
    and kept in :attr:`EpochStats.gradient_angles` as ``[batch, degrees]``.
    """
    model.train()
    batches = _Batches(model, loader)
    world = loader.world if isinstance(loader, BatchLoader) else WORLD
    totals = _Totals(batches.device, world)
    if world.distributed:
        optimizer = _AveragingOptimizer(optimizer, world, model.trainable_parameters())
    free_totals, nudged_totals = SolverTotals(batches.device), SolverTotals(batches.device)
    params = model.trainable_parameters()
    angles: list[list[float]] = []
    start = time.perf_counter()
    bar = tqdm(total=batches.count, desc=f"epoch {epoch}", unit="batch", leave=False,
               disable=not show_progress, dynamic_ncols=True)
    if warm_start is not None and not isinstance(loader, BatchLoader):
        raise TypeError(f"warm_start: keeps a state per sample of an eqprop BatchLoader, not of a {type(loader).__name__}")
    with bar:
        batch_count = 0
        for i, (x, y, target, indices) in enumerate(batches.with_indices(warm_start is not None), start=1):
            batch_count = i
            if world.distributed:
                optimizer.weight = x.shape[0] / loader.global_size(i)
                if x.shape[0] == 0:  # a share of nothing (a last batch smaller than the world) adds zeros
                    optimizer.step_with_zeros()
                    bar.update()
                    if i % refresh_every == 0 or i == batches.count:
                        _checked(totals, epoch, i)
                    continue
            if angle_every and (i - 1) % angle_every == 0:
                angles.append([i, gradient_angle(model, estimator, x, target, angle_bptt_steps)])
            initial = warm_start.start(model, x, indices) if warm_start is not None else None
            with torch.autocast(batches.device.type, torch.bfloat16, enabled=bf16_autocast):
                # the start only where there is one: an estimator of a user may not take it
                result = estimator.train_step(model, x, target, optimizer,
                                              **({} if initial is None else {"start": initial}))
            if warm_start is not None:
                warm_start.keep(indices, result.free_state)
            free_totals.add(result.free_stats)
            nudged_totals.add(result.nudged_stats)
            for hook in on_batch:
                hook(epoch, i, result)
            with torch.no_grad():
                free = [s.to(x.dtype) for s in result.free_state]
                totals.add(model.logits(free), model.head.loss(free[-1], target), y)
            bar.update()
            if i % refresh_every == 0 or i == batches.count:
                loss, error, finite = _checked(totals, epoch, i)
                if show_progress:
                    elapsed = time.perf_counter() - start
                    steps = {name: f"{t.steps / t.phases:.1f}" for name, t in
                             (("free", free_totals), ("nudged", nudged_totals)) if t.phases}
                    bar.set_postfix(loss=f"{loss:.4f}", err=f"{100 * error:.2f}%",
                                    speed=f"{totals.samples / elapsed:.0f}/s", **steps)
    seconds = time.perf_counter() - start
    totals.finite &= torch.isfinite(torch.stack([p.sum() for p in params])).all()  # NaN/inf propagate
    loss, error, _ = _checked(totals, epoch, batch_count)
    solver = {**free_totals.summary("free"), **nudged_totals.summary("nudged")}
    return EpochStats(loss, error, seconds, totals.all_samples, angles, solver)


class _AveragingOptimizer:
    """An optimizer of a distributed run: before each step, the ranks' gradients become their mean
    over the global batch (each weighted by its share, :attr:`weight`), in one all-reduce."""

    def __init__(self, optimizer: torch.optim.Optimizer, world: World, params: list[torch.nn.Parameter]) -> None:
        self.optimizer, self.world, self.params = optimizer, world, params
        self.weight = 1.0

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def step(self) -> None:
        self.world.weighted_sum_([p.grad for p in self.params], self.weight)
        self.optimizer.step()

    def step_with_zeros(self) -> None:
        """This rank's share of the batch is empty: it takes part in the all-reduce with zeros."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()
        self.step()


def _checked(totals: _Totals, epoch: int, batch: int) -> tuple[float, float, bool]:
    loss, error, finite = totals.read()
    if not finite:
        raise DivergenceError(f"training diverged in epoch {epoch} (NaN or inf by batch {batch})")
    return loss, error, finite


@torch.no_grad()
def evaluate(model: EnergyModel, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], solver: Solver | None = None,
             t1: int = 30, show_progress: bool = False) -> tuple[float, float, dict[str, float]]:
    """Mean loss and error rate of the free steady state over ``loader`` (a BatchLoader or any
    iterable of ``(x, y)`` batches, ``y`` integer labels or one-hot rows), and how it was solved
    (``free_steps`` and the rest of :meth:`SolverTotals.summary`) with the root mean square of each
    state layer (``state_rms/layerN``, from 1: a network saturating shows there). The free phase
    runs ``solver`` (None: the papers' fixed steps) with at most ``t1`` steps."""
    model.eval()
    solver = solver if solver is not None else build_solver("fixed")
    batches = _Batches(model, loader)
    totals = _Totals(batches.device, loader.world if isinstance(loader, BatchLoader) else WORLD)
    phases = SolverTotals(batches.device)
    squares: torch.Tensor | None = None  # per layer: the sum of squared units (on the device)
    units: list[int] = []  # per layer: how many
    for x, y, target, _ in tqdm(batches.with_indices(False), total=batches.count, desc="evaluation", unit="batch",
                                leave=False, disable=not show_progress, dynamic_ncols=True):
        if x.shape[0] == 0:  # a rank's empty share of a small last batch: it still takes part in the sums
            if squares is None:
                layers = len(model.init_state(x))
                squares, units = torch.zeros(layers, dtype=torch.float64, device=batches.device), [0] * layers
            continue
        clamped = model.clamp(x)
        state, stats = solver(model, clamped, model.init_state(x), t1)
        phases.add(stats)
        totals.add(model.logits(state), model.head.loss(state[-1], target), y)
        batch_squares = torch.stack([s.double().square().sum() for s in state])
        squares = batch_squares if squares is None else squares + batch_squares
        units = [n + s.numel() for n, s in zip(units or [0] * len(state), state)]
    loss, error, finite = totals.read()
    if not finite:
        raise DivergenceError("evaluation produced NaN or inf: the weights have diverged")
    summary = phases.summary("free")
    if squares is not None:
        sums = totals.world.sum_(torch.cat([squares, squares.new_tensor(units)]))
        mean_squares = sums[:len(units)] / sums[len(units):]
        summary |= {f"state_rms/layer{i + 1}": rms for i, rms in enumerate(mean_squares.sqrt().tolist())}
    return loss, error, summary
