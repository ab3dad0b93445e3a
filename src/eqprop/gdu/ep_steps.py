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
VF rules use :func:`~eqprop.estimators.vf.vector_field_grads`: the model's
closed form, or double autograd of Φ for a prototypical model.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..estimators.continual import continual_nudged_phase, layer_learning_rates
from ..estimators.vf import vector_field_grads
from ..models.base import EnergyModel, State

EP_ESTIMATORS = ("one_sided", "one_sided_neg", "symmetric", "c_ep", "vf", "c_vf")


@dataclass
class StepTraces:
    """Per-step updates: per state layer ``[K, B, ...]`` and per trainable parameter ``[K, ...]``."""

    neurons: list[Tensor]
    params: list[Tensor]


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
    vf_grads = vector_field_grads
    if estimator == "vf":  # one-sided VF: the pre-synaptic terms stay at s*
        vf_grads = lambda m, c, _state, delta: vector_field_grads(m, c, free, delta)  # noqa: E731
    if estimator in ("c_ep", "c_vf"):
        model = copy.deepcopy(model)
        lrs = layer_learning_rates(model, lr)
    else:
        lrs = [0.0] * len(model.trainable_parameters())
    result = continual_nudged_phase(model, model.clamp(x), free, beta, target, k, lrs, rule, record=True,
                                    vf_grads=vf_grads)
    return StepTraces(_stack(result.neuron_steps), _stack(result.param_steps))
