"""Symmetric vector-field estimate (Laborieux 2021 eq. 20).

Free phase, then +β and -β nudged phases, each from s*; for every parameter θ_i
of the dynamics (forward W, b and backward B alike)

    ∇̄_i = (1/2β) (∂F/∂θ_i(s^{+β}) · s^{+β} - ∂F/∂θ_i(s^{-β}) · s^{-β}).

Fully connected: ``ΔW_n ∝ s^n_+ (s^{n-1}_+)^T - s^n_- (s^{n-1}_-)^T`` and
``ΔB_{n+1} ∝ s^n_+ (s^{n+1}_+)^T - s^n_- (s^{n+1}_-)^T``, the transpose of
W_{n+1}'s update; conv layers differ through the pooling indices (forward
pooling for w, the pooling of ``B ⋆ s`` for B). Without a leak nothing pulls
W and B^T together: their difference only changes where the updates differ.

On a prototypical model each weight plays both roles (forward and backward);
eq. 20 per role gives ``∂Φ/∂θ`` (Φ is bilinear in the states), so the
estimate of a tied weight is the average of its two roles: symmetric EP,
``(G(s^{+β}) - G(s^{-β})) / 2β``. (Summing the roles would double the weights'
estimate but not the biases'.)
"""
from __future__ import annotations

from torch import Tensor

from ..models.base import Clamped, EnergyModel, State
from .base import head_difference, register
from .symmetric import SymmetricEP
from .vf import vector_field_grads


@register("symmetric_vf")
class SymmetricVF(SymmetricEP):
    """Three phases (free, +β, -β from s*), eq. 20 per forward and backward parameter."""

    models = "any"

    def direction(self, model: EnergyModel, clamped: Clamped, target: Tensor, plus: State,
                  minus: State) -> list[Tensor]:
        """Eq. 20 for every trainable parameter (the head: its symmetric EP update); on a
        prototypical model eq. 20 is symmetric EP (module docstring)."""
        if not model.is_vector_field:
            return super().direction(model, clamped, target, plus, minus)
        beta = self.phases.beta
        grads = [a.sub_(b).mul_(0.5 / beta) for a, b in zip(vector_field_grads(model, clamped, plus, plus),
                                                               vector_field_grads(model, clamped, minus, minus))]
        return grads + head_difference(model, target, (minus, -beta), (plus, beta))
