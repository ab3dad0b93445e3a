"""Networks defined by a formula: write Φ (or the vector field F), eqprop derives the rest.

A researcher's own network is a subclass of :class:`PhiModel` that declares its
state layers by name and writes its primitive Φ over them in plain torch::

    class Lateral(PhiModel):
        def __init__(self):
            super().__init__({"h": 256, "y": 10}, activation="hard_sigmoid")
            self.w1, self.w2 = nn.Linear(784, 256), nn.Linear(256, 10)
            self.lateral = nn.Parameter(torch.zeros(256, 256))

        def energy(self, x, s):
            h, y = s["h"], s["y"]
            return ((self.w1(x) * h).sum(1) + (self.w2(h) * y).sum(1)
                    + 0.5 * ((h @ self.lateral) * h).sum(1))

Its dynamics ``s ← σ(∂Φ/∂s)`` and its parameter gradients ``∂Φ/∂θ`` come from
autograd, so every EP estimator, every solver, BPTT, training, checkpoints and
the GDU check work on it unchanged. A network without a primitive (separate
forward and backward weights) subclasses :class:`FieldModel` and writes the
pre-activations F(x, s) instead; the vector-field estimators then train it.

Defaults: the activation is ``hard_sigmoid`` (any registered name, or any
elementwise function, whose derivative autograd gives); the readout is the
squared error on the last declared layer, whose size is then the number of
classes (``loss="ce"`` reads the last layer through a softmax readout of
``classes`` outputs instead). The last layer is the output layer.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..activations import Activation, as_activation
from ..heads import make_head
from .base import Clamped, EnergyModel, State


def _shape(name: str, size: int | Sequence[int]) -> tuple[int, ...]:
    shape = (size,) if isinstance(size, int) else tuple(size)
    if not shape or not all(isinstance(n, int) and n >= 1 for n in shape):
        raise ValueError(f"layer {name!r}: a size is a positive int or a shape of positive ints, got {size!r}")
    return shape


class PhiModel(EnergyModel):
    """Base of a network defined by its primitive Φ over named state layers.

    Args:
        layers: the state layers, input side first, output last: ``{name: size}`` with a size an
            int (a vector per sample) or a shape (e.g. ``(64, 14, 14)``).
        activation: σ, a registered name (``eqprop.activations.ACTIVATIONS``) or an elementwise
            function (its derivative by autograd).
        loss: ``"mse"``: squared error on the last layer (its size is the number of classes);
            ``"ce"``: a softmax readout of ``classes`` outputs reads the last layer.
        classes: the number of classes (``loss="ce"``; with ``"mse"`` it must equal the last
            layer's size when given).
        nudge: ``"inside"``: β's pull enters σ's argument (Laborieux 2021); ``"outside"``: added
            after σ (Ernoult 2020, squared error only).

    A subclass defines :meth:`energy` and creates its parameters in ``__init__`` after calling
    this one; each direct child module with parameters is one layer of the optimizer (one
    learning rate each, in the order they were assigned), the readout's parameters the last.
    """

    def __init__(self, layers: Mapping[str, int | Sequence[int]],
                 activation: str | Activation | Callable[[Tensor], Tensor] = "hard_sigmoid",
                 loss: str = "mse", classes: int | None = None, nudge: str = "inside") -> None:
        super().__init__()
        if not layers:
            raise ValueError("layers: declare at least one state layer, e.g. {'h': 256, 'y': 10}")
        if nudge not in ("inside", "outside"):
            raise ValueError(f"nudge: choose inside or outside, got {nudge!r}")
        self.layer_shapes = {name: _shape(name, size) for name, size in layers.items()}
        self.activation = as_activation(activation)
        last_name, last = list(self.layer_shapes.items())[-1]
        if loss == "mse":
            if len(last) != 1 or (classes is not None and classes != last[0]):
                raise ValueError(f"layer {last_name!r}: with loss mse the last layer is the output, a vector of "
                                 f"one unit per class; got shape {last}"
                                 + (f" for {classes} classes" if classes is not None else ""))
            classes = last[0]
        elif loss == "ce":
            if classes is None:
                raise ValueError("classes: a softmax readout (loss ce) needs the number of classes")
            if nudge == "outside":
                raise ValueError("nudge: the softmax readout nudges inside σ only; use nudge inside")
        self.head = make_head(loss, math.prod(last), classes, nudge == "inside")

    @property
    def layer_names(self) -> list[str]:
        """The state layers' names, input side first."""
        return list(self.layer_shapes)

    def energy(self, x: Tensor, s: dict[str, Tensor]) -> Tensor:
        """Φ(x, s) per sample, ``[B]``, with ``s`` the state layers by name (define it in a subclass)."""
        raise NotImplementedError(f"{type(self).__name__} must define energy(x, s) (Φ per sample)")

    def init_state(self, x: Tensor) -> State:
        """Zeros of every declared layer's shape, on ``x``'s device and dtype."""
        return [x.new_zeros((x.shape[0], *shape)) for shape in self.layer_shapes.values()]

    def named_state(self, state: State) -> dict[str, Tensor]:
        """The state as ``{name: tensor}``."""
        return dict(zip(self.layer_shapes, state))

    def phi(self, x: Tensor, state: State) -> Tensor:
        return self.energy(x, self.named_state(state))

    def layer_parameters(self) -> list[list[nn.Parameter]]:
        """One group per direct child module or parameter with parameters (in the order they were
        assigned), the readout's last when it has any."""
        groups = [[p] for name, p in self.named_parameters(recurse=False)]
        groups += [list(module.parameters()) for name, module in self.named_children()
                   if name != "head" and any(True for _ in module.parameters())]
        head = list(self.head.parameters())
        return groups + ([head] if head else [])


class FieldModel(PhiModel):
    """Base of a network defined by its vector field: the pre-activations ``F(x, s)``, one tensor per
    state layer, with ``s ← σ(F(x, s))``. No primitive exists (forward and backward weights may
    differ), so the vector-field estimators (``vf``, ``symmetric_vf``, ``kp_vf``, ``c_vf``) and
    BPTT train it; their parameter update ``(∂F/∂θ)^T δ`` comes from autograd.

    A subclass defines :meth:`field` instead of :meth:`energy`; the arguments are those of
    :class:`PhiModel`.
    """

    is_vector_field = True

    def field(self, x: Tensor, s: dict[str, Tensor]) -> dict[str, Tensor]:
        """The pre-activation of every state layer, ``{name: tensor}`` (define it in a subclass)."""
        raise NotImplementedError(f"{type(self).__name__} must define field(x, s) (the pre-activations)")

    def phi(self, x: Tensor, state: State) -> Tensor:
        raise TypeError(f"{type(self).__name__} is defined by its vector field and has no primitive Φ")

    def preactivations(self, clamped: Clamped, state: State) -> State:
        values = self.field(clamped.x, self.named_state(state))
        missing = [name for name in self.layer_shapes if name not in values]
        if missing:
            raise ValueError(f"{type(self).__name__}.field returned no pre-activation for {', '.join(missing)}")
        return [values[name] for name in self.layer_shapes]

    def param_grads(self, clamped: Clamped, state: State) -> list[Tensor]:
        raise TypeError(f"{type(self).__name__} is defined by its vector field: it has no ∂Φ/∂θ")

    def vector_field_grads(self, clamped: Clamped, state: State, delta: State) -> list[Tensor]:
        """``(∂F/∂θ at state)^T · delta``, batch mean, by autograd, aligned with :meth:`phi_parameters`."""
        params = self.phi_parameters()
        with torch.enable_grad():
            pre = self.preactivations(clamped, [s.detach() for s in state])
            inner = sum((u * d.detach()).sum() for u, d in zip(pre, delta)) / clamped.x.shape[0]
            grads = torch.autograd.grad(inner, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
