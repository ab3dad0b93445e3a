"""Vector-field (unidirectional) models: separate forward weights W and backward weights B.

SPEC §1, Laborieux 2021 §2.4: the dynamics keep the form of the prototypical
models but the top-down term uses its own weights,

    s^n ← σ(W_n s^{n-1} + b_n + B_{n+1} s^{n+1}),

B without bias. Fully connected: ``B_{n+1}`` has the shape of ``W_{n+1}^T``.
Convolutional (:mod:`.vf_cnn`): the top-down term is ``∂/∂s^n [s^{n+1} • P(B ⋆ s^n)]``,
the transposed convolution with B's own kernel of the upper state max-unpooled
with the indices of the pooling of ``B ⋆ s^n`` (the authors' VF ConvNet), so B
has the kernel shape of W. A backward weight exists for every layer that
receives top-down input: not for the first layer's W_1 (it faces the clamped
input) and not for the softmax readout (it is not in the dynamics).

With ``B = W^T`` (:meth:`VectorFieldModel.tie_backward_`) the dynamics are those
of the prototypical model. Otherwise no primitive Φ exists: :meth:`phi` and
:meth:`param_grads` raise, and the learning rules use
:meth:`vector_field_grads` instead, ``(∂u/∂θ at s)^T · δ`` with u the
pre-activation (the argument of σ).

Parameter names: the forward ones are those of the prototypical model
(``layers.k.weight``, ``convs.k.bias``...); the backward weight mirroring the
forward module ``layers.k`` is ``backward.layers.k`` (``backward.convs.k``,
``backward.fcs.k``). Each B sits in the optimizer group of the W it mirrors
(shared learning rate and weight decay, as in the paper).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..initialization import init_linear_
from .base import Clamped, EnergyModel, State
from .products import DenseProducts
from .mlp import PMLP

BACKWARD_INITS = ("independent", "flipped")


@dataclass(frozen=True)
class BackwardPair:
    """A forward weight W_layer and the backward weight B_layer that mirrors it.

    ``transposed``: B has the shape of W^T (fully connected); otherwise the same
    kernel shape (conv: the transposed convolution uses B as its kernel).
    """

    layer: int                # input-first number of the forward layer (W_layer maps s^{layer-1} to s^layer)
    forward: nn.Parameter
    backward: nn.Parameter
    transposed: bool

    def mirror(self, tensor: Tensor) -> Tensor:
        """Map a tensor between W's and B's shapes (an involution: W^T for fc, identity for conv)."""
        return tensor.t() if self.transposed else tensor


def check_backward_options(backward_init: str, backward_angle: float) -> None:
    """Refuse an unknown backward initialisation or an angle outside [0, 180] degrees."""
    if backward_init not in BACKWARD_INITS:
        raise ValueError(f"unknown backward_init {backward_init!r}; choose {' or '.join(BACKWARD_INITS)}")
    if not 0.0 <= float(backward_angle) <= 180.0:
        raise ValueError(f"backward_angle must be in [0, 180] degrees, got {backward_angle}")


class VectorFieldModel(EnergyModel):
    """Mixin for models whose top-down weights B are their own parameters (no Φ).

    Subclasses call :meth:`_make_backward` after building the forward layers
    and define :meth:`preactivations` and :meth:`vector_field_grads`.
    """

    is_vector_field = True

    backward: nn.ModuleDict
    _backward_spec: list[tuple[str, int, bool, int]]

    # -- structure -----------------------------------------------------------------
    def _make_backward(self, spec: Sequence[tuple[str, int, bool, int]]) -> None:
        """Create ``backward.<group>.<index>`` for every ``(group, index, transposed, layer)``."""
        groups: dict[str, nn.ParameterDict] = {}
        for group, index, transposed, _ in spec:
            w = getattr(self, group)[index].weight
            shape = w.t().shape if transposed else w.shape
            groups.setdefault(group, nn.ParameterDict())[str(index)] = nn.Parameter(torch.empty(shape, dtype=w.dtype))
        self.backward = nn.ModuleDict(groups)
        self._backward_spec = list(spec)

    def recurrent_weights(self) -> list[nn.Parameter]:
        return [p for pair in self.backward_pairs() for p in (pair.forward, pair.backward)]

    def backward_pairs(self) -> list[BackwardPair]:
        """Every (W, B) pair, input first."""
        return [BackwardPair(layer, getattr(self, group)[index].weight, self.backward[group][str(index)], transposed)
                for group, index, transposed, layer in self._backward_spec]

    def phi_parameters(self) -> list[nn.Parameter]:
        """The parameters of the dynamics F (there is no Φ): the prototypical model's, then every B."""
        forward = [p for name, p in self.named_parameters() if not name.startswith(("head.", "backward."))]
        return forward + [pair.backward for pair in self.backward_pairs()]

    def layer_parameters(self) -> list[list[nn.Parameter]]:
        groups = super().layer_parameters()
        for pair in self.backward_pairs():
            next(g for g in groups if any(p is pair.forward for p in g)).append(pair.backward)
        return groups

    # -- initialisation ------------------------------------------------------------
    @torch.no_grad()
    def reset_backward_(self, generator: torch.Generator | None = None, backward_init: str = "independent",
                        backward_angle: float = 0.0, init_scale: float = 1.0) -> None:
        """Initialise every B.

        ``independent``: PyTorch's default init of the backward map (kaiming-uniform
        of its own fan-in, no bias) times ``init_scale``, drawn from ``generator``.
        ``flipped`` (C-EP paper): ``B = W^T`` (conv: W) with each entry's sign flipped
        independently with probability ``(1 - cos Ψ)/2``, Ψ = ``backward_angle``
        degrees, so that the expected cosine between W and B^T is cos Ψ.
        """
        check_backward_options(backward_init, backward_angle)
        flip = (1.0 - math.cos(math.radians(backward_angle))) / 2.0
        for pair in self.backward_pairs():
            b = pair.backward
            if backward_init == "independent":
                init_linear_(b, None, generator, init_scale)
            else:
                mirrored = pair.mirror(pair.forward)
                draws = torch.rand(b.shape, generator=generator, dtype=torch.float64)
                b.copy_(torch.where(draws.to(b.device) < flip, -mirrored, mirrored))

    @torch.no_grad()
    def tie_backward_(self, source: EnergyModel | None = None) -> "VectorFieldModel":
        """Set B = W^T (conv: B = W): the prototypical model as a special case.

        With ``source`` (the matching prototypical model), first copy its
        parameters (same names) into the forward weights and the head.
        """
        if source is not None:
            result = self.load_state_dict(source.state_dict(), strict=False)
            missing = [k for k in result.missing_keys if not k.startswith("backward.")]
            if missing or result.unexpected_keys:
                raise ValueError(f"source does not match: missing {missing}, unexpected {result.unexpected_keys}")
        for pair in self.backward_pairs():
            pair.backward.copy_(pair.mirror(pair.forward))
        return self

    # -- no primitive --------------------------------------------------------------
    def phi(self, x: Tensor, state: State) -> Tensor:
        raise TypeError(f"{type(self).__name__} is a vector-field model: no primitive Φ exists when B ≠ W^T; "
                        "train it with a vector-field estimator (vf, symmetric_vf, kp_vf, c_vf) or BPTT")

    def param_grads(self, clamped: Clamped, state: State) -> list[Tensor]:
        raise TypeError(f"{type(self).__name__} has no ∂Φ/∂θ (no primitive Φ); the EP estimators do not apply, "
                        "use vector_field_grads (estimators vf, symmetric_vf, kp_vf, c_vf)")

    def param_grads_difference(self, clamped: Clamped, second: State, first: State,
                               scale: float = 1.0) -> list[Tensor]:
        return self.param_grads(clamped, second)  # raises: no ∂Φ/∂θ, whatever the scale

    def vector_field_grads(self, clamped: Clamped, state: State, delta: State) -> list[Tensor]:
        """``(∂u/∂θ at state)^T · delta``, batch mean, aligned with :meth:`phi_parameters`."""
        raise NotImplementedError



class VFMLP(VectorFieldModel, PMLP):
    """Fully connected vector-field network (same arguments as :class:`PMLP` plus B's init).

    The forward weights and the head are drawn from ``generator`` first, exactly
    as in a :class:`PMLP` with the same seed; the backward weights after them.
    """

    def __init__(self, sizes: Sequence[int], activation: str = "scaled_sigmoid", loss: str = "mse",
                 nudge_inside: bool = True, generator: torch.Generator | None = None, init_scale: float = 1.0,
                 backward_init: str = "independent", backward_angle: float = 0.0,
                 products: DenseProducts | None = None) -> None:
        check_backward_options(backward_init, backward_angle)
        super().__init__(sizes, activation, loss, nudge_inside, generator, init_scale, products)
        self._make_backward([("layers", k, True, k + 1) for k in range(1, len(self.layers))])
        self.reset_backward_(generator, backward_init, backward_angle, init_scale)

    def _top_down_weight(self, n: int) -> Tensor:
        return self.backward["layers"][str(n)].t()

    def vector_field_grads(self, clamped: Clamped, state: State, delta: State) -> list[Tensor]:
        # W_n: δ^n (s^{n-1})^T; b_n: δ^n; B_{n+1}: δ^n (s^{n+1})^T (all batch means)
        batch = clamped.x.shape[0]
        grads = []
        for n, d in enumerate(delta):
            below = clamped.x if n == 0 else state[n - 1]
            grads += [self.products.outer(d, below, 1.0 / batch), d.mean(dim=0)]
        grads += [self.products.outer(delta[n - 1], state[n], 1.0 / batch) for n in range(1, len(delta))]
        return grads
