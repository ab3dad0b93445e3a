"""One-sided vector-field estimate (Laborieux 2021 eq. 10, Scellier et al. 2018).

Free phase, one nudged phase at +β, then

    ∇̂ = (1/β) ∂F/∂θ(x, s*, θ)^T · (s^β - s*)

with ∂F/∂θ the derivative of the pre-activation at the free state: for a fully
connected layer ``ΔW_n ∝ (s^n_β - s^n_*)(s^{n-1}_*)^T`` and
``ΔB_{n+1} ∝ (s^n_β - s^n_*)(s^{n+1}_*)^T``, so W and B^T get different
updates and drift apart. The head (softmax readout) gets its EP update
``-∂ℓ/∂θ_head`` at s^β, as in :func:`~.base.ep_difference`.

This module also holds what the three VF estimators share:
:func:`vector_field_grads` for any model.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models.base import Clamped, EnergyModel, State
from .base import head_difference, register
from .one_sided import OneSidedEP


def vector_field_grads(model: EnergyModel, clamped: Clamped, state: State, delta: State) -> list[Tensor]:
    """``(∂F/∂θ at state)^T · delta`` for the parameters of the dynamics (head excluded), batch mean.

    Vector-field models (``model.is_vector_field``) give it in closed form (their
    ``vector_field_grads``). For a prototypical model
    F = ∂Φ/∂s, so this is ``∂/∂θ (∂Φ/∂s · delta)``, by double autograd of Φ with
    the state held fixed (pooling indices at ``state``); a tied weight collects
    both its forward and its backward role, as eq. 10 prescribes.
    """
    if model.is_vector_field:
        return model.vector_field_grads(clamped, state, delta)
    params = model.phi_parameters()
    with torch.enable_grad():
        leaves = [s.detach().requires_grad_() for s in state]
        drive = torch.autograd.grad(model.phi(clamped.x, leaves).sum(), leaves, create_graph=True)
        inner = sum((u * d.detach()).sum() for u, d in zip(drive, delta)) / clamped.x.shape[0]
        grads = torch.autograd.grad(inner, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


@register("vf")
class VectorFieldEstimator(OneSidedEP):
    """The conventional VF rule: post-synaptic change times pre-synaptic free state (the
    phases of one-sided EP)."""

    models = "any"

    def direction(self, model: EnergyModel, clamped: Clamped, target: Tensor, free: State, nudged: State,
                  beta: float) -> list[Tensor]:
        delta = [b - a for a, b in zip(free, nudged)]
        grads = [g.mul_(1.0 / beta) for g in vector_field_grads(model, clamped, free, delta)]
        return grads + head_difference(model, target, (free, 0.0), (nudged, beta))
