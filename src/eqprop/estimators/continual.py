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
   batch's dropout mask, see :func:`refresh_clamped`).

Learning rates and the optimizer: :meth:`ContinualEP.train_step` moves the
weights itself with plain SGD steps of each group's current ``lr`` (so
per-layer rates and schedulers apply) and never calls ``optimizer.step()``.
Momentum, Nesterov, weight decay, ``maximize`` and non-SGD optimizers have no
meaning for updates made inside the phase: they are refused with a
``ValueError`` rather than silently ignored.

:meth:`ContinualEP.estimate` does not change the model (the weights are
restored afterwards) and returns the total update divided by η per parameter,
``Σ_t Δ_θ(t)``: with η → 0 it equals the one-sided EP estimate. The η it
simulates is, in order, the ``lr`` argument, the rates of the last
:meth:`train_step`, or the constructor's ``lr`` (default 0, the η → 0 limit).

Random-sign β (``random_sign=True``): the sign of β is drawn per batch from
the estimator's CPU generator, like :class:`RandomSignEP`. The loops make no
host synchronisation and use no autograd (β, η are Python floats).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..models.base import Clamped, EnergyModel, State
from .base import Estimate, Estimator, Phases, register

Rule = Literal["ep", "vf"]
#: ``(model, clamped, state, delta) -> (∂u/∂θ(state))^T · delta`` for the non-head parameters
VectorFieldGrads = Callable[[EnergyModel, Clamped, State, State], list[Tensor]]


def refresh_clamped(model: EnergyModel, clamped: Clamped) -> Clamped:
    """The clamped input recomputed for the model's current weights, same batch and random draws.

    A model may define ``refresh_clamped(clamped)``; otherwise a batch without
    a dropout mask is clamped again, and one with a mask (P-CNN in training
    mode) keeps its mask and drops the cached drive and pooling indices, which
    the P-CNN recomputes from its current weights at every step.
    """
    refresh = getattr(model, "refresh_clamped", None)
    if refresh is not None:
        return refresh(clamped)
    if getattr(clamped, "mask", None) is None:
        return model.clamp(clamped.x)
    changes = {f.name: None for f in dataclasses.fields(clamped) if f.name in ("drive", "indices")}
    return dataclasses.replace(clamped, **changes)


def model_vector_field_grads(model: EnergyModel, clamped: Clamped, state: State, delta: State) -> list[Tensor]:
    """The model's closed-form ``vector_field_grads`` (vector-field models); TypeError otherwise."""
    grads = getattr(model, "vector_field_grads", None)
    if grads is None:
        raise TypeError(f"{type(model).__name__} has no vector_field_grads: the continual VF rule "
                        "needs a vector-field (unidirectional) model")
    return grads(clamped, state, delta)


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
                           vf_grads: VectorFieldGrads = model_vector_field_grads) -> ContinualResult:
    """Run ``steps`` nudged steps from ``state`` moving the weights at every step (module docstring).

    Changes the model's parameters in place (``p += lr · Δ_θ(t)``; ``lrs``
    aligned with ``model.trainable_parameters()``, 0 freezes a parameter).
    Call under ``torch.no_grad()``.
    """
    if beta == 0.0:
        raise ValueError("continual EP needs a nonzero β")
    if rule not in ("ep", "vf"):
        raise ValueError(f"unknown continual rule {rule!r}; choose ep or vf")
    params = model.trainable_parameters()
    lrs = [float(lr) for lr in lrs]
    if len(lrs) != len(params):
        raise ValueError(f"{len(lrs)} learning rates for {len(params)} trainable parameters")
    moving = any(lr != 0.0 for lr in lrs)
    has_head = any(True for _ in model.head.parameters())
    inv_beta = 1.0 / beta
    total = [torch.zeros_like(p) for p in params]
    neuron_steps: list[list[Tensor]] | None = [] if record else None
    param_steps: list[list[Tensor]] | None = [] if record else None
    for t in range(steps):
        nxt = model.step(clamped, state, beta, target)
        if rule == "ep":
            updates = model.param_grads_difference(clamped, nxt, state)
        else:
            updates = vf_grads(model, clamped, state, [a - b for a, b in zip(nxt, state)])
        if has_head:
            head = model.head.param_grads(nxt[-1], target, beta)
            if t > 0:  # G_{β_0}(s_0) = G_0(s*) = 0 for the head
                head = [a - b for a, b in zip(head, model.head.param_grads(state[-1], target, beta))]
            updates = list(updates) + head
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
            clamped = refresh_clamped(model, clamped)
        state = nxt
    return ContinualResult(total, state, clamped, neuron_steps, param_steps)


def optimizer_learning_rates(model: EnergyModel, optimizer: torch.optim.Optimizer) -> list[float]:
    """Per trainable parameter, the ``lr`` of the optimizer group holding it (0 if none).

    Refuses what a continual estimator cannot honour: any optimizer but SGD,
    momentum, Nesterov, weight decay and ``maximize``.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(f"continual estimators move the weights with plain SGD steps inside the nudged "
                         f"phase; {type(optimizer).__name__} cannot apply: use optim.name=sgd")
    lr_of: dict[int, float] = {}
    for group in optimizer.param_groups:
        for key in ("momentum", "weight_decay"):
            if group.get(key, 0.0):
                raise ValueError(f"continual estimators make plain SGD steps inside the nudged phase; "
                                 f"the optimizer's {key} ({group[key]}) cannot apply: set optim.{key}=0")
        if group.get("nesterov", False) or group.get("maximize", False):
            raise ValueError("continual estimators make plain SGD steps: nesterov/maximize cannot apply")
        lr = float(group["lr"])
        for p in group["params"]:
            lr_of[id(p)] = lr
    return [lr_of.get(id(p), 0.0) for p in model.trainable_parameters()]


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


@register("c_ep")
class ContinualEP(Estimator):
    """Continual EP: the weights follow ``(G(s_{t+1}) - G(s_t))/β`` at every nudged step."""

    config_fields: ClassVar[tuple[str, ...]] = ("random_sign",)
    rule: ClassVar[Rule] = "ep"
    moves_weights = True

    def __init__(self, phases: Phases, generator: torch.Generator | None = None,
                 random_sign: bool = False, lr: float | Sequence[float] = 0.0) -> None:
        super().__init__(phases, generator)
        if phases.beta == 0.0:
            raise ValueError("continual EP needs a nonzero β")
        self.random_sign = bool(random_sign)
        self.lr = lr
        self._last_lrs: list[float] | None = None

    def beta(self) -> float:
        """This batch's β: +β, or ±β drawn from the estimator's generator with ``random_sign``."""
        if self.random_sign and torch.randint(0, 2, (1,), generator=self.generator).item():
            return -self.phases.beta
        return self.phases.beta

    def check_model(self, model: EnergyModel) -> None:
        """Refuse a model the rule cannot train (C-VF: no vector_field_grads)."""
        if self.rule == "vf" and getattr(model, "vector_field_grads", None) is None:
            raise TypeError(f"{self.name} needs a vector-field model (with vector_field_grads); "
                            f"{type(model).__name__} has none")

    def _run(self, model: EnergyModel, x: Tensor, target: Tensor, lrs: list[float]) -> Estimate:
        self.check_model(model)
        clamped = model.clamp(x)
        free = self.free_phase(model, clamped)
        result = continual_nudged_phase(model, clamped, free, self.beta(), target, self.phases.t2, lrs,
                                        self.rule)
        return Estimate(result.direction, free)

    @torch.no_grad()
    def estimate(self, model: EnergyModel, x: Tensor, target: Tensor,
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
            return self._run(model, x, target, lrs)
        finally:
            for p, s in zip(params, saved):
                p.copy_(s)

    @torch.no_grad()
    def train_step(self, model: EnergyModel, x: Tensor, target: Tensor,
                   optimizer: torch.optim.Optimizer) -> Estimate:
        """Move the weights during the nudged phase with the optimizer's per-group rates (no ``step()``)."""
        lrs = optimizer_learning_rates(model, optimizer)
        self._last_lrs = lrs
        return self._run(model, x, target, lrs)


@register("c_vf")
class ContinualVF(ContinualEP):
    """Continual VF: W, b and B follow (post-synaptic change) x (pre-synaptic state) / β per step."""

    rule: ClassVar[Rule] = "vf"
    models = "vector_field"
