"""The bounded activations σ of the papers, each with its derivative.

The derivative is needed by analyses that compare neuron updates with BPTT
(SPEC §5) and by vector-field rules; the dynamics only use ``fn``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class Activation:
    """A named activation σ, its derivative σ', and its split ``σ(u) = core(scale·(u - shift))``.

    The split lets a model fold ``scale`` and ``shift`` into the matmuls it
    already does (``addmm``'s alpha/beta, a shifted bias), so a step costs one
    elementwise call per layer instead of three. ``core_`` is ``core`` applied in
    place (and returning its argument): a step that owns its preactivations
    overwrites them instead of allocating the new state. ``kernel_core`` names
    ``core`` for eqprop's C kernel (:mod:`eqprop.cpu_kernels`): "sigmoid",
    "clamp01", or None where the kernel does not implement it.
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor], Tensor]
    description: str
    core: Callable[[Tensor], Tensor]
    core_: Callable[[Tensor], Tensor]
    scale: float = 1.0
    shift: float = 0.0
    kernel_core: str | None = None


def _scaled_sigmoid(u: Tensor) -> Tensor:
    return torch.sigmoid(4.0 * u - 2.0)


def _scaled_sigmoid_derivative(u: Tensor) -> Tensor:
    s = _scaled_sigmoid(u)
    return 4.0 * s * (1.0 - s)


def _hard_sigmoid(u: Tensor) -> Tensor:
    return u.clamp(0.0, 1.0)


def _hard_sigmoid_(u: Tensor) -> Tensor:
    return u.clamp_(0.0, 1.0)


def _hard_sigmoid_derivative(u: Tensor) -> Tensor:
    return ((u > 0) & (u < 1)).to(u.dtype)


def _half_hard_sigmoid(u: Tensor) -> Tensor:
    return (0.5 * u).clamp(0.0, 1.0)


def _half_hard_sigmoid_derivative(u: Tensor) -> Tensor:
    return 0.5 * ((u > 0) & (u < 2)).to(u.dtype)


def _tanh_derivative(u: Tensor) -> Tensor:
    return 1.0 - torch.tanh(u) ** 2


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("scaled_sigmoid", _scaled_sigmoid, _scaled_sigmoid_derivative,
                   "1/(1+exp(-4(u-0.5))), the C-EP paper and Laborieux's MNIST runs",
                   torch.sigmoid, torch.sigmoid_, scale=4.0, shift=0.5, kernel_core="sigmoid"),
        Activation("hard_sigmoid", _hard_sigmoid, _hard_sigmoid_derivative,
                   "clamp(u, 0, 1)", _hard_sigmoid, _hard_sigmoid_, kernel_core="clamp01"),
        Activation("half_hard_sigmoid", _half_hard_sigmoid, _half_hard_sigmoid_derivative,
                   "clamp(u/2, 0, 1), Laborieux's CIFAR-10 ConvNets", _hard_sigmoid,
                   _hard_sigmoid_, scale=0.5, kernel_core="clamp01"),
        Activation("tanh", torch.tanh, _tanh_derivative, "tanh(u), the C-EP paper's GDU check", torch.tanh,
                   torch.tanh_),
    )
}


def get_activation(name: str) -> Activation:
    """Return the activation called ``name``; ValueError lists the valid names."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}") from None


def _autograd_derivative(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """σ' of an elementwise σ by autograd: ``∂(Σ σ(u))/∂u``."""
    def derivative(u: Tensor) -> Tensor:
        with torch.enable_grad():
            leaf = u.detach().requires_grad_()
            return torch.autograd.grad(fn(leaf).sum(), leaf)[0]
    return derivative


def make_activation(fn: Callable[[Tensor], Tensor], name: str | None = None,
                    derivative: Callable[[Tensor], Tensor] | None = None, description: str = "") -> Activation:
    """An :class:`Activation` from one elementwise function ``fn`` (e.g. ``lambda u: u.clamp(0, 6)``);
    its derivative by autograd unless ``derivative`` is given. Models defined by Φ use only ``fn``
    and ``derivative``; the closed-form built-in models need the named activations above."""
    if not callable(fn):
        raise TypeError(f"an activation is a function of a tensor, got {type(fn).__name__}")
    def core_(u: Tensor) -> Tensor:
        return u.copy_(fn(u))
    return Activation(name or getattr(fn, "__name__", "custom"), fn, derivative or _autograd_derivative(fn),
                      description or "user-defined", fn, core_)


def as_activation(value: "str | Activation | Callable[[Tensor], Tensor]") -> Activation:
    """The activation a model was given: a registered name, an :class:`Activation`, or a function."""
    if isinstance(value, Activation):
        return value
    if isinstance(value, str):
        return get_activation(value)
    return make_activation(value)


def register_activation(name: str, fn: Callable[[Tensor], Tensor],
                        derivative: Callable[[Tensor], Tensor] | None = None, description: str = "") -> Activation:
    """Make ``fn`` available by ``name`` to configurations (``model.activation: NAME``), e.g. from a
    plugin module. Names already taken are refused: a built-in keeps its meaning."""
    if name in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is already registered")
    ACTIVATIONS[name] = make_activation(fn, name, derivative, description)
    return ACTIVATIONS[name]
