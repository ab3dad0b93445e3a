"""Continual EP (C-EP) and continual VF (C-VF), Ernoult et al. 2020 (SPEC §4).

The free phase is the usual one. In the nudged phase the weights move at every
step, in this order, for t = 0..K-1:

1. ``s_{t+1} = F_β(x, s_t, θ_t)`` with the current weights;
2. ``θ_{t+1} = θ_t + η · Δ_θ(t)`` with, per parameter, η the learning rate of
   the optimizer's parameter group that holds it (no 1/K factor) and

   - C-EP: ``Δ_θ(t) = (G_β(s_{t+1}) - G_{β_t}(s_t)) / β``, both at θ_t, where
     ``G_β = ∂Φ_β/∂θ`` (:meth:`EnergyModel.param_grads_difference`, plus the
     head's ``∂(-βℓ)/∂θ``) and ``β_0 = 0``: the phase switches the nudge on at
     t = 0, so the head's first step counts from its free value 0. With θ
     frozen the sum telescopes to the one-sided EP estimate
     ``(G_β(s_K) - G_0(s*)) / β``;
   - C-VF: ``Δ_θ(t) = (∂u/∂θ(s_t))^T (s_{t+1} - s_t) / β`` (post-synaptic
     change times pre-synaptic state, :meth:`vector_field_grads` of the
     vector-field models: W_n, b_n and B_{n+1}, which share the rate of the
     group that holds them); the head, if any, as in C-EP.

3. The first layer's clamped drive (``model.clamp``, e.g. ``W_1 x + b_1``)
   depends on the weights, so it is recomputed after every update (keeping the
   batch's dropout mask, see :meth:`EnergyModel.refresh_clamped`).

Fully connected models (:class:`~eqprop.models.mlp.PMLP` and
:class:`~eqprop.models.vf.VFMLP`) skip the first layer's per-step work: the
input x is constant during the phase, so the first layer's update telescopes
and its weights act only through the drive, updated with the batch's B×B Gram
matrix instead of a B×input matmul (:func:`telescoped_first_layer`). Same
updates to rounding, about the cost of a one-sided EP step. On the CPU, where eqprop's C kernel
runs the model (squared-error nudge), the whole loop of K steps and updates is one kernel call
(:func:`eqprop.cpu_kernels.continual.continual_steps`).

Learning rates and the optimizer: :meth:`ContinualEP.train_step` moves the
weights itself with plain SGD steps of each group's current ``lr`` (so
per-layer rates and schedulers apply) and never calls ``optimizer.step()``.
Weight decay λ (a group's ``weight_decay``) is applied once per batch, after the
phase: ``θ ← (1 - η λ) θ``, the decay term of one SGD step; the phase's own
steps stay those above (λ = 0, the default, is the paper's rule). It is the
leak of the Kolen-Pollack rule (Laborieux 2021): it shrinks W and B alike,
and with them their difference W - B^T.
Momentum, Nesterov, ``maximize`` and non-SGD optimizers have no meaning for
updates made inside the phase: they are refused with a ``ValueError`` rather
than silently ignored.

:meth:`ContinualEP.estimate` does not change the model (the weights are
restored afterwards) and returns the total update divided by η per parameter,
``Σ_t Δ_θ(t)``: with η → 0 it equals the one-sided EP estimate. The η it
simulates is, in order, the ``lr`` argument, the rates of the last
:meth:`train_step`, or the constructor's ``lr`` (default 0, the η → 0 limit).

Random-sign β (``random_sign=True``): the sign of β is drawn per batch from
the estimator's CPU generator, like :class:`RandomSignEP`. The loops make no
host synchronisation and use no autograd (β, η are Python floats).

Stability (a property of the rule, not of this code). The updates feed back into the phase: the
first layer's step moves the next drive by ``(η_1/β)(x x^T + 1 1^T)/B · (s^1_{t+1} - s^1_t)``,
which the next step passes through σ'. For β > 0 the feedback is positive, with a per-step gain up
to ``(η_1/β)(λ_max(x x^T/B) + 1) · max σ'``; for β < 0 it has the same size but alternates in sign.
On MNIST batches of 20 (λ_max 25-59, median 41) that bound is about 1.2 at the C-EP-1h rates and 1.6
at the C-VF-1h rates. Measured (``benchmarks/continual_feedback.py``), at the C-VF-1h rates the
summed update of a phase differs from its η → 0 limit by about the limit's own size in the median
batch (β > 0), and at twice those rates the phase runs away (by a hundred times it).

C-VF's updates do not telescope, and that is what makes C-VF-1h collapse late in training
(README, *Reproduction*). C-EP sums ``G(s_{t+1}) - G(s_t)`` over the phase, so whatever the
state does between its ends cancels. C-VF sums ``(s^n_{t+1} - s^n_t) (s^m_t)^T``: for a sample
whose state alternates between two values (the period-2 cycle that synchronous updates fall
into once a loop's gain between two layers nears 1), each pair of steps adds
``(b - a)(c - d)^T`` with the same sign (a, b the post-synaptic values, c, d the pre-synaptic
ones): for a loop of positive gain it strengthens both W and B along the loop, which raises the
gain and brings more samples into a cycle. ``settle_tol`` (``estimator.options.settle_tol``,
both estimators) leaves out of the updates the samples whose free phase has not settled, by the
free solver's own last-step residual: EP's estimate assumes a steady state, and for these samples
there is none. With every sample settled it is the paper's rule.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat
from torch import Tensor

from ..cpu_kernels.continual import continual_steps
from ..models.base import Clamped, EnergyModel, State
from ..models.mlp import MLPClamped, PMLP
from ..solvers import SolverStats
from .base import Estimate, Estimator, Phases, register
from .vf import vector_field_grads

Rule = Literal["ep", "vf"]
#: ``(model, clamped, state, delta) -> (∂u/∂θ(state))^T · delta`` for the non-head parameters
VectorFieldGrads = Callable[[EnergyModel, Clamped, State, State], list[Tensor]]


@dataclasses.dataclass
class ContinualResult:
    """What :func:`continual_nudged_phase` returns.

    ``direction``: ``Σ_t Δ_θ(t)`` per trainable parameter (the total update
    divided by η); ``state``: s_K; ``clamped``: the clamped input refreshed for
    the final weights; ``neuron_steps`` / ``param_steps`` (``record=True``):
    per step t, ``(s_{t+1} - s_t)/β`` per layer and ``Δ_θ(t)`` per parameter.
    """

    direction: list[Tensor]
    state: State
    clamped: Clamped
    neuron_steps: list[list[Tensor]] | None = None
    param_steps: list[list[Tensor]] | None = None


def continual_nudged_phase(model: EnergyModel, clamped: Clamped, state: State, beta: float,
                           target: Tensor, steps: int, lrs: Sequence[float], rule: Rule = "ep",
                           record: bool = False,
                           vf_grads: VectorFieldGrads = vector_field_grads,
                           telescope: bool = True, include: Tensor | None = None) -> ContinualResult:
    """Run ``steps`` nudged steps from ``state`` moving the weights at every step (module docstring).

    Changes the model's parameters in place (``p += lr · Δ_θ(t)``; ``lrs``
    aligned with ``model.trainable_parameters()``, 0 freezes a parameter).
    Call under ``torch.no_grad()``.

    ``telescope``: take the fast path of :func:`telescoped_first_layer` where it
    applies (a fully connected model, no ``record``, the model's own
    ``vector_field_grads``); ``False`` forces the generic per-step path.

    ``include``: ``[B]`` booleans, the samples whose steps update the weights
    (None: all). The others run the phase like the rest but count as if their
    state stood still, so they add nothing (not for a readout with parameters,
    whose first step counts from its free value 0).
    """
    if beta == 0.0:
        raise ValueError("continual EP needs a nonzero β")
    if rule not in ("ep", "vf"):
        raise ValueError(f"unknown continual rule {rule!r}; choose ep or vf")
    params = model.trainable_parameters()
    lrs = [float(lr) for lr in lrs]
    if len(lrs) != len(params):
        raise ValueError(f"{len(lrs)} learning rates for {len(params)} trainable parameters")
    if include is not None and any(True for _ in model.head.parameters()):
        raise ValueError("leaving samples out of a continual phase needs a readout without parameters")
    if (telescope and not record and (rule == "ep" or vf_grads is vector_field_grads)
            and first_layer_telescopes(model, clamped)):
        return telescoped_first_layer(model, clamped, state, beta, target, steps, lrs, rule, include)
    keep = sample_masks(include, state)
    moving = any(lr != 0.0 for lr in lrs)
    inv_beta = 1.0 / beta
    total = [torch.zeros_like(p) for p in params]
    neuron_steps: list[list[Tensor]] | None = [] if record else None
    param_steps: list[list[Tensor]] | None = [] if record else None
    for t in range(steps):
        nxt = model.step(clamped, state, beta, target)
        seen = counted(nxt, state, keep)
        updates = step_updates(model, clamped, seen, state, beta, target, t, rule, vf_grads)
        if len(updates) != len(params):
            raise RuntimeError(f"{type(model).__name__} gave {len(updates)} updates for {len(params)} parameters")
        # the updates are G differences; 1/β (and η/β) are folded into the in-place adds
        for p, u, acc, lr in zip(params, updates, total, lrs):
            acc.add_(u, alpha=inv_beta)
            if lr != 0.0:
                p.add_(u, alpha=lr * inv_beta)
        if record:
            neuron_steps.append([(a - b) * inv_beta for a, b in zip(nxt, state)])
            param_steps.append([u * inv_beta for u in updates])
        if moving:
            clamped = model.refresh_clamped(clamped)
        state = nxt
    return ContinualResult(total, state, clamped, neuron_steps, param_steps)


@dataclasses.dataclass
class SampleMasks:
    """``include`` (``[B]`` booleans) shaped once per phase to broadcast over each layer, with
    one buffer per layer for :func:`counted` (no allocation per step)."""

    keep: list[Tensor]
    seen: list[Tensor]


def sample_masks(include: Tensor | None, state: State) -> SampleMasks | None:
    """The masks of a phase that leaves the samples outside ``include`` out (None: none)."""
    if include is None:
        return None
    return SampleMasks([include.view(-1, *([1] * (s.dim() - 1))) for s in state],
                       [torch.empty_like(s) for s in state])


def counted(nxt: State, state: State, masks: SampleMasks | None) -> State:
    """``nxt`` for the included samples, ``state`` for the others: the step as the update rules
    see it (an unchanged sample adds nothing). Written into the masks' buffers."""
    if masks is None:
        return nxt
    return [torch.where(k, a, b, out=o) for k, a, b, o in zip(masks.keep, nxt, state, masks.seen)]


def step_updates(model: EnergyModel, clamped: Clamped, nxt: State, state: State, beta: float, target: Tensor,
                 t: int, rule: Rule, vf_grads: VectorFieldGrads = vector_field_grads) -> list[Tensor]:
    """``β · Δ_θ(t)`` for every trainable parameter, from ``state`` = s_t to ``nxt`` = s_{t+1} (module doc)."""
    if rule == "ep":
        updates = list(model.param_grads_difference(clamped, nxt, state))
    else:
        updates = list(vf_grads(model, clamped, state, [a - b for a, b in zip(nxt, state)]))
    if any(True for _ in model.head.parameters()):
        head = model.head.param_grads(nxt[-1], target, beta)
        if t > 0:  # G_{β_0}(s_0) = G_0(s*) = 0 for the head
            head = [a - b for a, b in zip(head, model.head.param_grads(state[-1], target, beta))]
        updates += head
    return updates


def first_layer_telescopes(model: EnergyModel, clamped: Clamped) -> bool:
    """True for the models :func:`telescoped_first_layer` applies to.

    A :class:`PMLP` (or :class:`~eqprop.models.vf.VFMLP`) clamped by
    ``PMLP.clamp``: its first layer is a Linear on the clamped input x, the step
    reads the first layer's weights only through ``clamped.offsets[0]``, and its
    update rules read x only in the first layer's outer product.
    """
    return "telescoped_first_layer" in model.fast_paths() and isinstance(clamped, MLPClamped)


def telescoped_first_layer(model: PMLP, clamped: MLPClamped, state: State, beta: float, target: Tensor,
                           steps: int, lrs: list[float], rule: Rule,
                           include: Tensor | None = None) -> ContinualResult:
    """:func:`continual_nudged_phase` for a fully connected model, its first layer telescoped.

    For the first layer, on the clamped input x (``[B, input]``), both rules
    make the same update at step t (batch means, ``η_W``, ``η_b`` the rates of
    W_1 and b_1, ``Δ_t = s^1_t - s^1_0``, ``[B, H]``)::

        W_1(t+1) = W_1(t) + (η_W/β)/B · (s^1_{t+1} - s^1_t)^T x
        b_1(t+1) = b_1(t) + (η_b/β)   · mean_batch(s^1_{t+1} - s^1_t)

    x is constant during the phase, so the sum telescopes:
    ``W_1(t) = W_1(0) + (η_W/β)/B · Δ_t^T x`` and ``b_1(t) = b_1(0) + (η_b/β)/B · 1^T Δ_t``.
    The whole phase's update ``(η/β)/B · Δ_K^T x`` is therefore applied once,
    at the end (one outer product instead of K), and during the phase the
    weights act only through the drive::

        drive_t = x W_1(t)^T + b_1(t) = drive_0 + M Δ_t,   M = (η_W/β · x x^T + η_b/β · 1 1^T) / B,

    with M the ``[B, B]`` mixing matrix of the batch (its Gram matrix x x^T),
    computed once: a B×B×H update per step instead of the B×input×H re-clamp.
    The other layers (and the head) keep the per-step rule, whose update
    functions get an input with no features so that they skip the first
    layer's outer product (:func:`first_layer_telescopes` checks the model).
    The results equal the per-step path's to rounding; with ``record`` or
    another model use :func:`continual_nudged_phase`'s generic path.
    """
    params = model.trainable_parameters()
    first = model.layers[0]
    i_w = next(i for i, p in enumerate(params) if p is first.weight)
    i_b = next(i for i, p in enumerate(params) if p is first.bias)
    x, drive_0, start = clamped.x, clamped.drive, state[0]
    inv_beta, inv_batch = 1.0 / beta, 1.0 / x.shape[0]
    rate_w, rate_b = lrs[i_w] * inv_beta, lrs[i_b] * inv_beta
    moving = any(lr != 0.0 for lr in lrs)
    mixing = None
    if rate_w != 0.0 or rate_b != 0.0:
        mixing = torch.mm(x, x.t()).mul_(rate_w * inv_batch).add_(rate_b * inv_batch)
    no_input = Clamped(x[:, :0])   # the update rules' first-layer outer product becomes [H, 0]
    total = [torch.zeros_like(p) for p in params]
    masks = sample_masks(include, state)
    first_keep = None if masks is None else masks.keep[0]
    change = torch.empty_like(start)   # Δ_t, written in place at every step

    def moved(clamped: MLPClamped, nxt: State) -> MLPClamped:
        """θ_{t+1}'s clamped input: the drive from the telescoped first layer, the other offsets
        from the biases."""
        drive = (drive_0 if mixing is None
                 else torch.addmm(drive_0, mixing, first_change(nxt[0], start, first_keep, change)))
        return model.clamped_from_drive(x, drive, clamped.transposed)

    in_kernel = continual_steps(model, clamped, state, beta, target, steps, lrs, rule, include, mixing, total)
    if in_kernel is not None:   # the same steps in one call of the C kernel
        state = in_kernel
        if moving and steps > 0:
            clamped = moved(clamped, state)
    for t in range(steps if in_kernel is None else 0):
        nxt = model.step(clamped, state, beta, target)
        seen = counted(nxt, state, masks)
        updates = step_updates(model, no_input, seen, state, beta, target, t, rule)
        if len(updates) != len(params):
            raise RuntimeError(f"{type(model).__name__} gave {len(updates)} updates for {len(params)} parameters")
        for i, (p, u, acc, lr) in enumerate(zip(params, updates, total, lrs)):
            if i == i_w or i == i_b:
                continue
            acc.add_(u, alpha=inv_beta)
            if lr != 0.0:
                p.add_(u, alpha=lr * inv_beta)
        if moving:
            clamped = moved(clamped, nxt)
        state = nxt
    first_change(state[0], start, first_keep, change)   # the first layer's whole-phase update, telescoped
    total[i_w].add_(torch.mm(change.t(), x), alpha=inv_batch * inv_beta)
    total[i_b].add_(change.mean(dim=0), alpha=inv_beta)
    for i in (i_w, i_b):
        if lrs[i] != 0.0:
            params[i].add_(total[i], alpha=lrs[i])
    return ContinualResult(total, state, clamped)


def first_change(now: Tensor, start: Tensor, keep: Tensor | None, out: Tensor) -> Tensor:
    """``Δ_t = s^1_t - s^1_0`` of :func:`telescoped_first_layer` written into ``out``, zero for the
    samples ``keep`` leaves out."""
    torch.sub(now, start, out=out)
    return out if keep is None else out.mul_(keep)


def optimizer_learning_rates(model: EnergyModel,
                             optimizer: torch.optim.Optimizer) -> tuple[list[float], list[float]]:
    """Per trainable parameter, the ``lr`` and ``weight_decay`` of the optimizer group holding it
    (0 and 0 if none).

    Refuses what a continual estimator cannot honour: any optimizer but SGD,
    momentum, Nesterov and ``maximize``.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(f"continual estimators move the weights with plain SGD steps inside the nudged "
                         f"phase; {type(optimizer).__name__} cannot apply: use optim.name=sgd")
    rates_of: dict[int, tuple[float, float]] = {}
    for group in optimizer.param_groups:
        if group.get("momentum", 0.0):
            raise ValueError(f"continual estimators make plain SGD steps inside the nudged phase; "
                             f"the optimizer's momentum ({group['momentum']}) cannot apply: set optim.momentum=0")
        if group.get("nesterov", False) or group.get("maximize", False):
            raise ValueError("continual estimators make plain SGD steps: nesterov/maximize cannot apply")
        for p in group["params"]:
            rates_of[id(p)] = (float(group["lr"]), float(group.get("weight_decay", 0.0)))
    rates = [rates_of.get(id(p), (0.0, 0.0)) for p in model.trainable_parameters()]
    return [lr for lr, _ in rates], [decay for _, decay in rates]


def layer_learning_rates(model: EnergyModel, lr: float | Sequence[float]) -> list[float]:
    """Per trainable parameter, from one rate or one per layer (``model.layer_parameters()`` order)."""
    if isinstance(lr, (int, float)):
        return [float(lr)] * len(model.trainable_parameters())
    groups = model.layer_parameters()
    lr = [float(v) for v in lr]
    if len(lr) != len(groups):
        raise ValueError(f"the model has {len(groups)} layers but {len(lr)} learning rates were given")
    lr_of = {id(p): v for params, v in zip(groups, lr) for p in params}
    return [lr_of.get(id(p), 0.0) for p in model.trainable_parameters()]


class ContinualOptions(BaseModel):
    """``estimator.options`` of ``c_ep`` and ``c_vf``."""

    model_config = ConfigDict(extra="forbid")
    settle_tol: PositiveFloat | None = Field(
        None, description="leave out of the updates the samples whose free phase has not settled: last free "
                          "step's max-norm change above this (a state cycling between two values makes C-VF grow "
                          "its W-B loop; eqprop.estimators.continual); None: every sample, the paper's rule")


@register("c_ep")
class ContinualEP(Estimator):
    """Continual EP: the weights follow ``(G(s_{t+1}) - G(s_t))/β`` at every nudged step."""

    config_fields: ClassVar[tuple[str, ...]] = ("random_sign",)
    rule: ClassVar[Rule] = "ep"
    #: fully connected models telescope their first layer (:func:`telescoped_first_layer`);
    #: set ``False`` on an instance to force the generic per-step path (tests, benchmarks)
    telescope_first_layer: bool = True
    moves_weights = True
    options_schema = ContinualOptions

    def __init__(self, phases: Phases, generator: torch.Generator | None = None,
                 random_sign: bool = False, lr: float | Sequence[float] = 0.0,
                 settle_tol: float | None = None) -> None:
        super().__init__(phases, generator)
        if phases.beta == 0.0:
            raise ValueError("continual EP needs a nonzero β")
        if settle_tol is not None and not settle_tol > 0.0:
            raise ValueError(f"settle_tol must be positive (or None), got {settle_tol}")
        self.random_sign = bool(random_sign)
        self.lr = lr
        self.settle_tol = settle_tol
        self._last_lrs: list[float] | None = None

    def beta(self) -> float:
        """This batch's β: +β, or ±β drawn from the estimator's generator with ``random_sign``."""
        if self.random_sign and torch.randint(0, 2, (1,), generator=self.generator).item():
            return -self.phases.beta
        return self.phases.beta

    def check_model(self, model: EnergyModel) -> None:
        """Refuse a model the rule cannot train (C-VF: no vector_field_grads)."""
        if self.rule != "ep" and not model.is_vector_field:
            raise TypeError(f"{self.name} needs a vector-field model (with vector_field_grads); "
                            f"{type(model).__name__} has none")

    def _run(self, model: EnergyModel, x: Tensor, target: Tensor, lrs: list[float],
             start: State | None = None) -> Estimate:
        self.check_model(model)
        clamped = model.clamp(x)
        free, free_stats = self.free_phase(model, clamped, start)
        include = self.settled(free_stats)
        result = continual_nudged_phase(model, clamped, free, self.beta(), target, self.phases.t2, lrs,
                                        self.rule, telescope=self.telescope_first_layer, include=include)
        excluded = None if include is None else (~include).sum()
        return Estimate(result.direction, free, free_stats, SolverStats(self.phases.t2, None, excluded=excluded))

    def settled(self, free_stats: SolverStats) -> Tensor | None:
        """Per sample, whether its free phase settled (``settle_tol``); None: every sample counts."""
        if self.settle_tol is None:
            return None
        if free_stats.residual is None:
            raise ValueError(f"settle_tol: the free solver ({self.phases.free_solver().name}) reports no residual")
        return free_stats.residual <= self.settle_tol

    @torch.no_grad()
    def estimate(self, model: EnergyModel, x: Tensor, target: Tensor, start: State | None = None,
                 lr: float | Sequence[float] | None = None) -> Estimate:
        """Total update divided by η of one continual phase, leaving the model unchanged (module doc)."""
        if lr is not None:
            lrs = layer_learning_rates(model, lr)
        elif self._last_lrs is not None:
            lrs = self._last_lrs
        else:
            lrs = layer_learning_rates(model, self.lr)
        params = model.trainable_parameters()
        saved = [p.detach().clone() for p in params] if any(lrs) else []
        try:
            return self._run(model, x, target, lrs, start)
        finally:
            for p, s in zip(params, saved):
                p.copy_(s)

    @torch.no_grad()
    def train_step(self, model: EnergyModel, x: Tensor, target: Tensor,
                   optimizer: torch.optim.Optimizer, start: State | None = None) -> Estimate:
        """Move the weights during the nudged phase with the optimizer's per-group rates, then
        apply its weight decay once (no ``step()``; module docstring)."""
        lrs, decays = optimizer_learning_rates(model, optimizer)
        self._last_lrs = lrs
        result = self._run(model, x, target, lrs, start)
        for p, lr, decay in zip(model.trainable_parameters(), lrs, decays):
            if lr and decay:
                p.mul_(1.0 - lr * decay)
        return result


@register("c_vf")
class ContinualVF(ContinualEP):
    """Continual VF: W, b and B follow (post-synaptic change) x (pre-synaptic state) / β per step."""

    rule: ClassVar[Rule] = "vf"
    models = "vector_field"
