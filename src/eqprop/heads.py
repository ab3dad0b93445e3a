"""Losses and how they nudge the network (SPEC §2).

A head turns the last state layer s^N into a prediction, a per-sample loss ℓ,
and the nudging term ``-β ∂ℓ/∂s^N`` of the nudged dynamics (Φ_β = Φ - βℓ).
Heads with parameters (the softmax readout) also give ``∂(-βℓ)/∂θ``, so that
estimators treat them like any other parameter of Φ_β.

Targets are one-hot float tensors ``[B, classes]``, encoded once per batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .initialization import init_linear_


class Head(nn.Module):
    """Base class: prediction, loss and nudge on the last state layer."""

    #: add the nudge to the pre-activation (inside σ, Laborieux 2021) or after σ (Ernoult 2020)
    nudge_inside: bool = True
    #: number of classes predicted
    classes: int

    def logits(self, s_last: Tensor) -> Tensor:
        """Class scores read from the last state layer, ``[B, classes]``."""
        raise NotImplementedError

    def loss(self, s_last: Tensor, target: Tensor) -> Tensor:
        """Per-sample loss ℓ, ``[B]``."""
        raise NotImplementedError

    def nudge(self, s_last: Tensor, target: Tensor, beta: float) -> Tensor:
        """The nudging term ``-β ∂ℓ/∂s^N`` (same shape as ``s_last``)."""
        raise NotImplementedError

    def param_grads(self, s_last: Tensor, target: Tensor, beta: float) -> list[Tensor]:
        """``∂(-βℓ)/∂θ`` for the head's own parameters, batch mean (empty if none)."""
        return []


class SquaredError(Head):
    """ℓ = ½‖s^N - y‖², the output layer is part of the dynamics."""

    def __init__(self, classes: int, nudge_inside: bool = True) -> None:
        super().__init__()
        self.classes = classes
        self.nudge_inside = nudge_inside

    def logits(self, s_last: Tensor) -> Tensor:
        return s_last

    def loss(self, s_last: Tensor, target: Tensor) -> Tensor:
        return 0.5 * (s_last - target).pow(2).sum(dim=1)

    def nudge(self, s_last: Tensor, target: Tensor, beta: float) -> Tensor:
        return beta * (target - s_last)


class SoftmaxReadout(Head):
    """ŷ = softmax(W_out flatten(s^N) + b_out), cross-entropy loss (Laborieux 2021 §3.2).

    The readout is not part of the state: it only enters the dynamics through
    the nudge ``β W_out^T (y - softmax(W_out s^N))`` (eq. 19).
    """

    nudge_inside = True

    def __init__(self, in_features: int, classes: int) -> None:
        super().__init__()
        self.classes = classes
        self.linear = nn.Linear(in_features, classes)

    def reset_parameters(self, generator: torch.Generator | None, scale: float = 1.0) -> None:
        """PyTorch's default Linear init, drawn from ``generator``."""
        init_linear_(self.linear.weight, self.linear.bias, generator, scale)

    def logits(self, s_last: Tensor) -> Tensor:
        return F.linear(s_last.flatten(1), self.linear.weight, self.linear.bias)

    def loss(self, s_last: Tensor, target: Tensor) -> Tensor:
        return -(target * F.log_softmax(self.logits(s_last), dim=1)).sum(dim=1)

    def _error_signal(self, s_last: Tensor, target: Tensor) -> Tensor:
        """``y - softmax(z)`` = ``-∂ℓ/∂z``."""
        return target - torch.softmax(self.logits(s_last), dim=1)

    def nudge(self, s_last: Tensor, target: Tensor, beta: float) -> Tensor:
        drive = (beta * self._error_signal(s_last, target)) @ self.linear.weight
        return drive.view_as(s_last)

    def param_grads(self, s_last: Tensor, target: Tensor, beta: float) -> list[Tensor]:
        err = self._error_signal(s_last, target) * (beta / s_last.shape[0])
        return [err.t() @ s_last.flatten(1), err.sum(dim=0)]


def make_head(loss: str, last_size: int, classes: int, nudge_inside: bool = True) -> Head:
    """Build the head for ``loss`` ("mse" or "ce") reading a last layer of ``last_size`` units."""
    if loss == "mse":
        return SquaredError(classes, nudge_inside)
    if loss == "ce":
        return SoftmaxReadout(last_size, classes)
    raise ValueError(f"unknown loss {loss!r}; choose mse or ce")
