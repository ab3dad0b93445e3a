"""KP-VF: symmetric VF with the same update for W and B, and a leak (Laborieux 2021 eq. 21).

For every pair (W_{n+1}, B_{n+1}) both get the average of their eq. 20 estimates,

    ∇̂ = ½ (∇̄_W + ∇̄_B^T)   (conv: ½ (∇̄_w + ∇̄_B), B having w's kernel shape),
    ΔW = η (∇̂ - λ W),   ΔB^T = η (∇̂ - λ B^T),

so W - B^T decays as (1 - ηλ)^t whatever the data (Kolen & Pollack 1994), while
the common part follows the gradient: W and B^T align. Fully connected, the two
eq. 20 terms are already equal (the paper notes it) and only the leak acts;
conv layers differ through the pooling indices, and the average needs them
from both pathways.

The leak λ (``estimator.leak``) is written into ∇̂: ``∇̂_W -= λW``, ``∇̂_B -= λB``,
only for the weights of a W-B pair (not the biases, W_1 or the readout, which
eq. 21 does not concern). For SGD, with or without momentum, and for Adam's
coupled L2, this is exactly the optimizer's ``weight_decay = λ`` restricted to
those weights. Laborieux et al. ran KP-VF with no separate leak: their
weight decay 3e-4 on every layer (W and B share it) *is* λ. To reproduce that,
use ``leak = 0`` with ``optim.weight_decay = 3e-4``; a non-zero leak on top of a
weight decay adds up.

On a prototypical model (B = W^T by construction) the average is symmetric EP
itself; the leak then applies to the weights that carry top-down input (W_n,
n ≥ 2, every layer that has a B in the VF model), so that a VF model with
B = W^T and its prototypical twin get the same estimate.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models.base import EnergyModel, State
from ..models.vf import VectorFieldModel
from .base import Estimate, Phases, register
from .symmetric_vf import SymmetricVF


@register("kp_vf")
class KPVF(SymmetricVF):
    """Symmetric VF, the same update for W and B^T, each minus its own leak λθ."""

    models = "any"

    config_fields = ("leak",)

    def __init__(self, phases: Phases, generator: torch.Generator | None = None, leak: float = 0.0) -> None:
        super().__init__(phases, generator)
        if leak < 0:
            raise ValueError(f"leak must be >= 0, got {leak}")
        self.leak = float(leak)

    @torch.no_grad()
    def estimate(self, model: EnergyModel, x: Tensor, target: Tensor, start: State | None = None) -> Estimate:
        result = super().estimate(model, x, target, start)
        direction = result.direction
        position = {id(p): i for i, p in enumerate(model.trainable_parameters())}
        if isinstance(model, VectorFieldModel):
            for pair in model.backward_pairs():
                i, j = position[id(pair.forward)], position[id(pair.backward)]
                common = direction[i].add_(pair.mirror(direction[j])).mul_(0.5)
                # in B's own layout (channels-last or not), which fill_grads then copies without conversion
                direction[j] = torch.empty_like(pair.backward).copy_(pair.mirror(common))
        if self.leak:
            for p in model.recurrent_weights():   # eq. 21's leak: every W and B of a pair
                i = position[id(p)]
                direction[i].sub_(p, alpha=self.leak)
        return result
