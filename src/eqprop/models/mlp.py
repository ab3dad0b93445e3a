"""P-MLP: the prototypical fully connected convergent RNN (SPEC §1).

Φ = Σ_n s^n · (W_n s^{n-1} + b_n), so the closed-form dynamics are
``s^n ← σ(W_n s^{n-1} + b_n + W_{n+1}^T s^{n+1})``. The first term of the
first layer, ``W_1 x + b_1``, is computed once per batch (:meth:`clamp`): it is
the largest matmul of the step and it never changes while x is clamped.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..activations import get_activation
from ..heads import make_head
from ..initialization import init_linear_
from .base import Clamped, EnergyModel, State, is_free
from .products import DenseProducts


@dataclass
class MLPClamped(Clamped):
    """:class:`Clamped` plus the constant terms of the fast step, already in σ's core units:
    ``k·(W_1 x + b_1 - c)`` for the first layer and ``k·(b_n - c)`` for the others, where
    ``σ(u) = core(k·(u - c))`` (see :class:`~eqprop.activations.Activation`).

    ``transposed[n]`` marks layers narrower than the batch: their forward term is
    computed as ``(W_n s^{n-1 T})^T`` (offset stored as a column), which BLAS does
    about twice as fast as ``s^{n-1} W_n^T`` for a 10-unit output layer.
    """

    offsets: list[Tensor] = field(default_factory=list)
    transposed: list[bool] = field(default_factory=list)
    #: the weights the step reads (``W_n``, and the top-down matrix of each layer but the last),
    #: looked up once per batch rather than through the modules at every step
    weights: list[Tensor] = field(default_factory=list)
    top_down: list[Tensor] = field(default_factory=list)

    def repeat_batch(self, times: int) -> "MLPClamped":
        # the tensor fields repeat as in every Clamped; of the offsets only the first layer's is per sample
        repeated = super().repeat_batch(times)
        repeated.offsets = [torch.cat([self.offsets[0]] * times)] + self.offsets[1:]
        return repeated


class PMLP(EnergyModel):
    """Fully connected P-MLP with sizes ``[input, hidden..., classes]``.

    With the squared-error loss the last size is the output layer, part of the
    dynamics; with the softmax readout ("ce") the last linear map is the
    readout and the state ends at the last hidden layer. The parameter count is
    the same either way.
    """

    def __init__(self, sizes: Sequence[int], activation: str = "scaled_sigmoid",
                 loss: str = "mse", nudge_inside: bool = True,
                 generator: torch.Generator | None = None, init_scale: float = 1.0,
                 products: DenseProducts | None = None) -> None:
        super().__init__()
        #: computes the input drive and the weight gradients: PyTorch's, or a backend's (eqprop's
        #: C kernel on the CPU, :class:`~eqprop.cpu_kernels.KernelProducts`)
        self.products = products if products is not None else DenseProducts()
        sizes = [int(n) for n in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"an MLP needs at least an input and an output size >= 1, got {sizes}")
        if loss == "ce" and len(sizes) < 3:
            raise ValueError("the softmax readout (loss ce) needs at least one hidden layer")
        self.sizes = sizes
        self.activation = get_activation(activation)
        in_phi = sizes if loss == "mse" else sizes[:-1]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(in_phi[:-1], in_phi[1:]))
        self.head = make_head(loss, in_phi[-1], sizes[-1], nudge_inside)
        for layer in self.layers:
            init_linear_(layer.weight, layer.bias, generator, init_scale)
        if hasattr(self.head, "reset_parameters"):
            self.head.reset_parameters(generator, init_scale)

    def init_state(self, x: Tensor) -> State:
        batch = x.shape[0]
        return [x.new_zeros(batch, layer.out_features) for layer in self.layers]

    def layer_parameters(self) -> list[list[nn.Parameter]]:
        groups = [[layer.weight, layer.bias] for layer in self.layers]
        head = list(self.head.parameters())
        return groups + ([head] if head else [])

    def phi(self, x: Tensor, state: State) -> Tensor:
        below = [x.flatten(1)] + list(state[:-1])
        return sum((s * layer(b)).sum(dim=1) for s, b, layer in zip(state, below, self.layers))

    def clamp(self, x: Tensor) -> MLPClamped:
        x = x.flatten(1)
        first = self.layers[0]
        transposed = [n > 0 and layer.out_features < x.shape[0] for n, layer in enumerate(self.layers)]
        return self.clamped_from_drive(x, self.products.linear(x, first.weight, first.bias), transposed)

    def clamped_from_drive(self, x: Tensor, drive: Tensor, transposed: list[bool]) -> MLPClamped:
        """The :class:`MLPClamped` of ``x`` given its first-layer drive ``W_1 x + b_1`` (the other
        offsets from the current biases): continual EP updates the drive without a matmul."""
        k, c = self.activation.scale, self.activation.shift
        constants = [drive] + [layer.bias for layer in self.layers[1:]]
        offsets = constants if (k, c) == (1.0, 0.0) else [(t - c) * k for t in constants]
        offsets = [o.unsqueeze(1) if t else o for o, t in zip(offsets, transposed)]
        weights = [layer.weight for layer in self.layers]
        top_down = [self._top_down_weight(n) for n in range(1, len(self.layers))]
        return MLPClamped(x, drive, offsets, transposed, weights, top_down)

    def supports_cuda_graphs(self) -> bool:
        return True

    def fast_paths(self) -> frozenset[str]:
        own = type(self)
        paths = set()
        if own.step is PMLP.step and own.half_step is PMLP.half_step and own._update is PMLP._update:
            paths.add("c_kernel")
        if own.clamp is PMLP.clamp and own.refresh_clamped is EnergyModel.refresh_clamped:
            paths.add("telescoped_first_layer")
        return frozenset(paths)

    def recurrent_weights(self) -> list[nn.Parameter]:
        return [layer.weight for layer in self.layers[1:]]

    def step(self, clamped: MLPClamped, state: State, beta: float | Tensor = 0.0,
             target: Tensor | None = None) -> State:
        """The base class's step with σ's scale and shift folded into the matmuls:
        one ``addmm`` per weight and one elementwise call per layer. Without autograd,
        σ overwrites the preactivations it owns (no new allocation per layer)."""
        return self._update(clamped, state, beta, target, None)

    def half_step(self, clamped: MLPClamped, state: State, parity: int, beta: float | Tensor = 0.0,
                  target: Tensor | None = None) -> State:
        """:meth:`step` for the layers of index ``n % 2 == parity`` only (the others kept): each
        layer reads only its neighbours, so a sweep of two half-steps costs one step."""
        return self._update(clamped, state, beta, target, parity)

    def _update(self, clamped: MLPClamped, state: State, beta: float | Tensor, target: Tensor | None,
                parity: int | None) -> State:
        """The new state of every layer (``parity`` None) or of the layers of that parity."""
        k, core = self.activation.scale, self.activation.core
        core_ = self.activation.core_ if not torch.is_grad_enabled() else core
        weights, top_down, transposed = clamped.weights, clamped.top_down, clamped.transposed
        last = len(state) - 1
        updated = [parity is None or n % 2 == parity for n in range(len(state))]
        new = []
        for n, offset in enumerate(clamped.offsets):
            if not updated[n]:
                new.append(state[n])
                continue
            if n == 0:
                u = offset
            elif transposed[n]:
                u = torch.addmm(offset, weights[n], state[n - 1].t(), alpha=k).t()
            else:
                u = torch.addmm(offset, state[n - 1], weights[n].t(), alpha=k)
            if n < last:
                u = torch.addmm(u, state[n + 1], top_down[n], alpha=k)
            new.append(u)
        nudge = None if is_free(beta) or not updated[last] else self.head.nudge(state[-1], target, beta)
        if nudge is not None and self.head.nudge_inside:
            new[-1] = torch.add(new[-1], nudge, alpha=k) if last == 0 else new[-1].add_(nudge, alpha=k)
        # a one-layer model's free preactivation is the clamped offset itself: σ must not overwrite it
        new = [u if not updated[n] else core(u) if u is clamped.offsets[0] else core_(u)
               for n, u in enumerate(new)]
        if nudge is not None and not self.head.nudge_inside:
            new[-1] = new[-1] + nudge
        return new

    def preactivations(self, clamped: Clamped, state: State) -> State:
        layers, last = self.layers, len(state) - 1
        pre = []
        for n, layer in enumerate(layers):
            u = clamped.drive if n == 0 else torch.addmm(layer.bias, state[n - 1], layer.weight.t())
            if n < last:
                u = torch.addmm(u, state[n + 1], self._top_down_weight(n + 1))
            pre.append(u)
        return pre

    def _top_down_weight(self, n: int) -> Tensor:
        """The ``[out, in]`` matrix carrying s^{n+1} down into s^n (``s^{n+1} @ it``), for the
        layer of index n in ``self.layers``: W itself here (B = W^T); vector-field models
        return their own B^T."""
        return self.layers[n].weight

    def param_grads(self, clamped: Clamped, state: State) -> list[Tensor]:
        batch = clamped.x.shape[0]
        grads = []
        for n, s in enumerate(state):
            below = clamped.x if n == 0 else state[n - 1]
            grads += [self.products.outer(s, below, 1.0 / batch), s.mean(dim=0)]
        return grads

    def param_grads_difference(self, clamped: Clamped, second: State, first: State,
                               scale: float = 1.0) -> list[Tensor]:
        # ∂Φ/∂W_n = s^n (s^{n-1})^T is bilinear: the first layer's input x is the same in both
        # states, so (s2 - s1)^T x costs one matmul; deeper layers stack both states into one.
        # The bias gradient sums the same stacked difference (one reduction instead of two means).
        batch = clamped.x.shape[0]
        grads = []
        for n, (s2, s1) in enumerate(zip(second, first)):
            if n == 0:
                left, right = s2 - s1, clamped.x
            else:
                left, right = torch.cat([s2, -s1]), torch.cat([second[n - 1], first[n - 1]])
            grads += [self.products.outer(left, right, scale / batch), left.sum(dim=0).mul_(scale / batch)]
        return grads
