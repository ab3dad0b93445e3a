"""Random-sign EP: one-sided EP with the sign of β drawn per mini-batch (Laborieux 2021 §2.3).

The sign is drawn from the estimator's CPU generator, which checkpoints save,
so a resumed run draws the same signs.
"""
from __future__ import annotations

import torch

from .base import register
from .one_sided import OneSidedEP


@register("random_sign")
class RandomSignEP(OneSidedEP):
    """One-sided EP at +β or -β with probability ½ each; the O(β) bias cancels on average."""

    def beta(self) -> float:
        flip = torch.randint(0, 2, (1,), generator=self.generator).item()
        return -self.phases.beta if flip else self.phases.beta
