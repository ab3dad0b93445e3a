"""EP's per-step updates over the nudged phase, for every estimator the check compares (SPEC §5).

For t = 1..K (the t-th nudged step, ``s^β_0 = s*``):

- neurons ``Δ_s(t) = (s^β_t - s^β_{t-1}) / β``, per sample;
- weights ``Δ_θ(t)``: the update of the t-th step divided by η, aligned with
  ``model.trainable_parameters()``:

  ``one_sided`` / ``one_sided_neg``  (G_β(s^β_t) - G_{β}(s^β_{t-1}))/β at +β / -β, θ frozen
  ``symmetric``  the mean of the +β and -β traces, i.e. the ±β combination
                 ``(ΔG(s^{+β}) - ΔG(s^{-β}))/(2β)`` step by step
  ``c_ep``       C-EP, the weights moving with rate ``lr`` (run on a copy of the model)
  ``vf``         one-sided VF: ``(∂u/∂θ(s*))^T (s^β_t - s^β_{t-1}) / β`` (pre-synaptic s*)
  ``c_vf``       C-VF, ``(∂u/∂θ(s^β_{t-1}))^T (s^β_t - s^β_{t-1}) / β`` with the weights moving

The head's ``G_β`` starts from its free value 0 (``β_0 = 0``, as in
:mod:`eqprop.estimators.continual`), so every trace sums to its estimator's
estimate (one-sided, symmetric, VF; C-EP/C-VF: total update / η).
VF rules use the model's ``vector_field_grads``; a model without it (P-models)
gets the same quantity by autograd (:func:`vector_field_vjp`).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..estimators.continual import continual_nudged_phase, layer_learning_rates
from ..models.base import Clamped, EnergyModel, State

EP_ESTIMATORS = ("one_sided", "one_sided_neg", "symmetric", "c_ep", "vf", "c_vf")


@dataclass
class StepTraces:
    """Per-step updates: per state layer ``[K, B, ...]`` and per trainable parameter ``[K, ...]``."""

    neurons: list[Tensor]
    params: list[Tensor]


def vector_field_vjp(model: EnergyModel, clamped: Clamped, state: State, delta: State) -> list[Tensor]:
    """``(∂u/∂θ(state))^T · delta``, batch mean, for the non-head parameters.

    The model's closed form ``vector_field_grads`` when it has one, else
    autograd through :meth:`preactivations` (analysis only).
    """
    closed = getattr(model, "vector_field_grads", None)
    if closed is not None:
        return closed(clamped, state, delta)
    head_ids = {id(p) for p in model.head.parameters()}
    body = [p for p in model.trainable_parameters() if id(p) not in head_ids]
    batch = clamped.x.shape[0]
    with torch.enable_grad():
        fresh = model.clamp(clamped.x)
        if hasattr(clamped, "mask"):
            fresh.mask = clamped.mask
        pre = model.preactivations(fresh, [s.detach() for s in state])
        grads = torch.autograd.grad(pre, body, grad_outputs=[d / batch for d in delta], allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(body, grads)]


def _stack(steps: list[list[Tensor]]) -> list[Tensor]:
    return [torch.stack(per_step) for per_step in zip(*steps)]


def symmetric_traces(plus: StepTraces, minus: StepTraces) -> StepTraces:
    """Symmetric EP step by step from the +β and -β one-sided traces: their mean."""
    return StepTraces([(a + b) / 2 for a, b in zip(plus.neurons, minus.neurons)],
                      [(a + b) / 2 for a, b in zip(plus.params, minus.params)])


@torch.no_grad()
def ep_step_updates(model: EnergyModel, x: Tensor, free: State, target: Tensor, beta: float, k: int,
                    estimator: str, lr: float | Sequence[float] = 0.0) -> StepTraces:
    """The per-step updates of ``estimator`` (module docstring) over K nudged steps from ``free`` = s*.

    The model is not changed (C-EP and C-VF run on a deep copy).
    """
    if estimator == "symmetric":
        return symmetric_traces(ep_step_updates(model, x, free, target, beta, k, "one_sided"),
                                ep_step_updates(model, x, free, target, beta, k, "one_sided_neg"))
    if estimator not in EP_ESTIMATORS:
        raise ValueError(f"unknown GDU estimator {estimator!r}; choose one of {', '.join(EP_ESTIMATORS)}")
    if estimator == "one_sided_neg":
        beta = -beta
    rule = "vf" if estimator in ("vf", "c_vf") else "ep"
    vf_grads = vector_field_vjp
    if estimator == "vf":  # one-sided VF: the pre-synaptic terms stay at s*
        vf_grads = lambda m, c, _state, delta: vector_field_vjp(m, c, free, delta)  # noqa: E731
    if estimator in ("c_ep", "c_vf"):
        model = copy.deepcopy(model)
        lrs = layer_learning_rates(model, lr)
    else:
        lrs = [0.0] * len(model.trainable_parameters())
    result = continual_nudged_phase(model, model.clamp(x), free, beta, target, k, lrs, rule, record=True,
                                    vf_grads=vf_grads)
    return StepTraces(_stack(result.neuron_steps), _stack(result.param_steps))
