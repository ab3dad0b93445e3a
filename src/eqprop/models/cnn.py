"""P-CNN: the prototypical convolutional convergent RNN (SPEC §1, Laborieux 2021 eq. 7-8).

Layers, input first: ``L`` conv layers, each ``conv → +bias → 2x2 max-pool
stride 2``, then fully connected layers on the flattened (C, H, W) last conv
state. Per sample,

    Φ(x, s) = Σ_conv s^n • P(w_n ⋆ s^{n-1} + b_n) + Σ_fc s^n · (W_n f(s^{n-1}) + b_n),

with s^0 = x, • the scalar product over (C, H, W) and ``f`` the flattening
(times the dropout mask for the last conv state, see below). With the squared
error every fc layer is in the dynamics (the last one is the output layer);
with the softmax readout ("ce") the last fc map is the readout (the head, not
in Φ) and the state ends at the last fc hidden layer, or at the last conv layer
when ``fc == [classes]`` (the paper's CIFAR-10 network).

Closed form of ``∂Φ/∂s^n`` for a conv layer (no autograd per step):

- forward term ``P(w_n ⋆ s^{n-1} + b_n)``;
- backward term ``w_{n+1}^T ⋆ P^{-1}(s^{n+1})``: the upper state max-unpooled
  with the indices of the forward pooling of layer n+1 at the same state (its
  exact derivative: max-pooling routes the gradient to the arg-max), then the
  transposed convolution with ``w_{n+1}`` (stride, padding and output padding
  chosen so the shape is exactly that of s^n).

Each conv + pool (with indices) is computed once per step and serves both
terms. The first layer's drive ``P(w_1 ⋆ x + b_1)`` and its pooling indices are
constant while x is clamped: :meth:`PCNN.clamp` computes them once per batch.
``model.to(memory_format=torch.channels_last)`` makes the states channels-last
too (:meth:`PCNN.memory_format`): faster on CPU (1.4-1.5x per step in bench_cnn_step.py --small), where NCHW max-pooling
is slow.

Dropout (Laborieux 2021 §4.1, a mask per mini-batch held through the free and
both nudged phases): in training mode with ``dropout > 0``, :meth:`PCNN.clamp`
draws a keep-mask ``m`` (Bernoulli(1-p), scaled 1/(1-p)) over the flattened
last conv state, from ``model.dropout_generator`` (None: the global RNG). The
mask applies to the last conv state *where it feeds the layer above*: the
first fc layer of Φ reads ``m ⊙ flatten(s^L)``, and so does the softmax
readout when it reads the last conv layer directly (logits, loss, nudge and
readout gradient). The conv layer's own term ``s^L • P(...)`` is unmasked, so
dropped units still follow their bottom-up input and feed back into layer L-1,
but nothing above sees them. Everything stays the gradient of one
``Φ_β = Φ - βℓ``: ``∂Φ_β/∂s^L`` gets ``m ⊙`` the fc/readout terms. The mask
of the latest :meth:`clamp` is kept in ``Clamped.mask`` (used by the closed
forms, and by the readout's nudge inside :meth:`step`, so the mask travels
with the clamped input and a CUDA graph replays with its own batch's mask)
and in ``model.dropout_mask`` (used by :meth:`phi` and by the readout outside
the phases); both are ignored in eval mode.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activations import get_activation
from ..heads import SoftmaxReadout, make_head
from ..initialization import init_linear_
from .base import Clamped, EnergyModel, State, is_free


@dataclass
class ConvClamped(Clamped):
    """:class:`Clamped` plus the first layer's pooling indices and the batch's dropout mask.

    ``drive`` is ``P(w_1 ⋆ x + b_1)``; ``indices`` the arg-max indices of that
    pooling (for the first layer's weight gradient); ``mask`` the dropout
    keep-mask ``[B, features]`` of the flattened last conv state, or None.
    """

    indices: Tensor | None = None
    mask: Tensor | None = None


class MaskedSoftmaxReadout(SoftmaxReadout):
    """The softmax readout reading ``mask ⊙ flatten(s^N)`` in training mode.

    Used when the readout reads the last conv layer directly. ``mask`` is set
    by :meth:`PCNN.clamp` (None: no dropout); ℓ, the nudge ``-β ∂ℓ/∂s^N`` (which
    carries the mask by the chain rule) and ``∂(-βℓ)/∂θ`` all use it, so BPTT's
    loss and EP's Φ_β see the same readout. Eval mode ignores the mask.
    """

    mask: Tensor | None = None

    def _batch_mask(self, batch: int) -> Tensor | None:
        """The mask for a batch of ``batch`` samples (tiled when phases run side by side)."""
        if not self.training or self.mask is None:
            return None
        mask = self.mask
        return mask if mask.shape[0] == batch else mask.repeat(batch // mask.shape[0], 1)

    def _features(self, s_last: Tensor) -> Tensor:
        f = s_last.flatten(1)
        mask = self._batch_mask(f.shape[0])
        return f if mask is None else f * mask

    def logits(self, s_last: Tensor) -> Tensor:
        return F.linear(self._features(s_last), self.linear.weight, self.linear.bias)

    def nudge(self, s_last: Tensor, target: Tensor, beta: float) -> Tensor:
        drive = (beta * self._error_signal(s_last, target)) @ self.linear.weight
        mask = self._batch_mask(drive.shape[0])
        if mask is not None:
            drive = drive * mask
        return drive.view_as(s_last)

    def param_grads(self, s_last: Tensor, target: Tensor, beta: float) -> list[Tensor]:
        err = self._error_signal(s_last, target) * (beta / s_last.shape[0])
        return [err.t() @ self._features(s_last), err.sum(dim=0)]


def _per_layer(name: str, n: int, values: Sequence[int], minimum: int) -> list[int]:
    values = [int(v) for v in values]
    if len(values) != n:
        raise ValueError(f"{name} needs one value per conv layer ({n}), got {len(values)}")
    if min(values) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {values}")
    return values


class PCNN(EnergyModel):
    """Prototypical ConvNet: conv + 2x2 max-pool layers, then fully connected layers.

    ``channels`` are the output channels of each conv layer; ``fc`` the fully
    connected sizes after flattening the last conv state, the last being the
    number of classes (output layer for "mse", softmax readout for "ce").
    """

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int], kernels: Sequence[int],
                 strides: Sequence[int], paddings: Sequence[int], fc: Sequence[int],
                 activation: str = "half_hard_sigmoid", loss: str = "ce", nudge_inside: bool = True,
                 dropout: float = 0.0, generator: torch.Generator | None = None,
                 init_scale: float = 1.0, dropout_generator: torch.Generator | None = None) -> None:
        super().__init__()
        input_shape = [int(v) for v in input_shape]
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) with sizes >= 1, got {input_shape}")
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 1:
            raise ValueError(f"channels needs at least one conv layer with >= 1 channel, got {channels}")
        n_conv = len(channels)
        kernels = _per_layer("kernels", n_conv, kernels, 1)
        strides = _per_layer("strides", n_conv, strides, 1)
        paddings = _per_layer("paddings", n_conv, paddings, 0)
        fc = [int(n) for n in fc]
        if not fc or min(fc) < 1:
            raise ValueError(f"fc needs at least the number of classes, all >= 1, got {fc}")
        if loss not in ("mse", "ce"):
            raise ValueError(f"unknown loss {loss!r}; choose mse or ce")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

        # spatial sizes: conv output (before pooling) and state (after pooling) of each layer
        c, h, w = input_shape
        self.conv_shapes: list[tuple[int, int, int]] = []   # conv output (C, H, W), before pooling
        self.state_shapes: list[tuple[int, ...]] = []       # every state layer, without batch
        self.output_paddings: list[tuple[int, int]] = []    # for the transposed conv back to the input
        for n, (co, k, st, p) in enumerate(zip(channels, kernels, strides, paddings)):
            if k > h + 2 * p or k > w + 2 * p:
                raise ValueError(f"kernel {k} of conv layer {n + 1} exceeds its padded {h}x{w} input")
            hc, wc = (h + 2 * p - k) // st + 1, (w + 2 * p - k) // st + 1
            if hc < 2 or wc < 2:
                raise ValueError(f"conv layer {n + 1} maps {h}x{w} to {hc}x{wc}: too small for the 2x2 max-pool")
            self.output_paddings.append((h - ((hc - 1) * st - 2 * p + k), w - ((wc - 1) * st - 2 * p + k)))
            self.conv_shapes.append((co, hc, wc))
            c, h, w = co, hc // 2, wc // 2
            self.state_shapes.append((c, h, w))
        features = c * h * w

        self.input_shape = tuple(input_shape)
        self.channels, self.kernels, self.strides, self.paddings = channels, kernels, strides, paddings
        self.fc, self.features = fc, features
        self.dropout = float(dropout)
        #: draws the dropout masks (None: PyTorch's global generator)
        self.dropout_generator = dropout_generator
        self.dropout_mask: Tensor | None = None
        self.activation = get_activation(activation)

        in_phi = [features] + (fc if loss == "mse" else fc[:-1])
        self.convs = nn.ModuleList(
            nn.Conv2d(ci, co, k, stride=st, padding=p)
            for ci, co, k, st, p in zip([input_shape[0]] + channels[:-1], channels, kernels, strides, paddings))
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(in_phi[:-1], in_phi[1:]))
        self.state_shapes += [(n,) for n in in_phi[1:]]
        if loss == "ce" and not self.fcs:
            self.head = MaskedSoftmaxReadout(features, fc[-1])
        else:
            self.head = make_head(loss, in_phi[-1], fc[-1], nudge_inside)
        for layer in list(self.convs) + list(self.fcs):
            init_linear_(layer.weight, layer.bias, generator, init_scale)
        if hasattr(self.head, "reset_parameters"):
            self.head.reset_parameters(generator, init_scale)

    # -- structure ---------------------------------------------------------------
    def memory_format(self) -> torch.memory_format:
        """``torch.channels_last`` if the conv weights are (``model.to(memory_format=...)``), else NCHW.

        The conv states are created in that layout so that every conv, pool and
        transposed conv of a step runs in it (channels-last is faster on CPU).
        """
        for conv in self.convs:
            w = conv.weight
            if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
                return torch.channels_last
        return torch.contiguous_format

    def init_state(self, x: Tensor) -> State:
        batch, layout = x.shape[0], self.memory_format()
        return [torch.zeros(batch, *shape, dtype=x.dtype, device=x.device) if len(shape) == 1 else
                torch.empty(batch, *shape, dtype=x.dtype, device=x.device, memory_format=layout).zero_()
                for shape in self.state_shapes]

    def layer_parameters(self) -> list[list[nn.Parameter]]:
        groups = [[layer.weight, layer.bias] for layer in list(self.convs) + list(self.fcs)]
        head = list(self.head.parameters())
        return groups + ([head] if head else [])

    def _active_mask(self) -> Tensor | None:
        return self.dropout_mask if self.training else None

    # -- Φ (reference definition, autograd-friendly) ----------------------------------
    def phi(self, x: Tensor, state: State) -> Tensor:
        n_conv = len(self.convs)
        below = x
        total = x.new_zeros(x.shape[0])
        for s, conv in zip(state[:n_conv], self.convs):
            total = total + (s * F.max_pool2d(conv(below), 2, 2)).sum(dim=(1, 2, 3))
            below = s
        below = below.flatten(1)
        mask = self._active_mask()
        if mask is not None:
            below = below * mask
        for s, layer in zip(state[n_conv:], self.fcs):
            total = total + (s * layer(below)).sum(dim=1)
            below = s
        return total

    # -- dynamics ------------------------------------------------------------------
    def supports_cuda_graphs(self) -> bool:
        # the dropout mask travels with the clamped input, which a graph copies in before each replay
        return True

    def recurrent_weights(self) -> list[nn.Parameter]:
        return [layer.weight for layer in list(self.convs)[1:] + list(self.fcs)]

    def step(self, clamped: Clamped, state: State, beta: float | Tensor = 0.0,
             target: Tensor | None = None) -> State:
        """The base class's step; a softmax readout reading the last conv state takes the dropout
        mask of ``clamped`` for its nudge (not the model's latest one): the mask travels with the
        clamped input, so a replayed CUDA graph reads the mask of its own batch."""
        head = self.head
        if not isinstance(head, MaskedSoftmaxReadout) or is_free(beta):
            return super().step(clamped, state, beta, target)
        latest = head.mask
        head.mask = clamped.mask if isinstance(clamped, ConvClamped) else None
        try:
            return super().step(clamped, state, beta, target)
        finally:
            head.mask = latest

    def clamp(self, x: Tensor) -> ConvClamped:
        first = self.convs[0]
        drive, indices = F.max_pool2d(first(x), 2, 2, return_indices=True)
        mask = None
        if self.training and self.dropout > 0.0:
            keep = 1.0 - self.dropout
            mask = torch.empty(x.shape[0], self.features, device=x.device, dtype=x.dtype)
            mask.bernoulli_(keep, generator=self.dropout_generator).mul_(1.0 / keep)
        self.dropout_mask = mask
        if isinstance(self.head, MaskedSoftmaxReadout):
            self.head.mask = mask
        return ConvClamped(x, drive, indices, mask)

    def refresh_clamped(self, clamped: Clamped) -> Clamped:
        """Clamp again, except with a dropout mask: that is kept, and the cached first-layer
        drive and pooling indices are dropped (the step then computes them from the current
        weights)."""
        if not isinstance(clamped, ConvClamped) or clamped.mask is None:
            return self.clamp(clamped.x)
        return replace(clamped, drive=None, indices=None)

    def _conv_pool(self, n: int, below: Tensor) -> tuple[Tensor, Tensor]:
        """``P(w_n ⋆ below + b_n)`` and its pooling indices (n counted from 0)."""
        return F.max_pool2d(self.convs[n](below), 2, 2, return_indices=True)

    def _conv_back(self, n: int, upper: Tensor, indices: Tensor) -> Tensor:
        """``w_n^T ⋆ P^{-1}(upper)``: the gradient of ``upper • P(w_n ⋆ s)`` w.r.t. s (n from 0)."""
        conv = self.convs[n]
        unpooled = F.max_unpool2d(upper, indices, 2, 2, output_size=self.conv_shapes[n][1:])
        return F.conv_transpose2d(unpooled, conv.weight, None, conv.stride, conv.padding,
                                  self.output_paddings[n])

    def _conv_terms(self, n: int, below: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        """Conv layer n's forward term ``P(w_n ⋆ below)`` and the top-down term it sends to
        ``below``: the transposed conv of ``upper`` unpooled with the same pooling (n from 0)."""
        forward, indices = self._conv_pool(n, below)
        return forward, self._conv_back(n, upper, indices)

    def _fc_top_down_weight(self, m: int) -> Tensor:
        """The ``[out, in]`` matrix carrying fc layer m's state down (``state @ it``): W itself
        here; vector-field models return their own B^T."""
        return self.fcs[m].weight

    def preactivations(self, clamped: Clamped, state: State) -> State:
        n_conv = len(self.convs)
        mask = self._mask(clamped)
        drive = clamped.drive if clamped.drive is not None else self._conv_pool(0, clamped.x)[0]
        pre: list[Tensor] = [drive]
        # conv layers 2..L: each step's conv + pool computed once, for both terms
        for n in range(1, n_conv):
            forward, top_down = self._conv_terms(n, state[n - 1], state[n])
            pre[n - 1] = pre[n - 1] + top_down
            pre.append(forward)
        # fully connected layers
        for m, layer in enumerate(self.fcs):
            n = n_conv + m
            below, down = state[n - 1], self._fc_top_down_weight(m)
            if m == 0:
                flat = below.flatten(1)
                back = torch.mm(state[n], down)
                if mask is not None:
                    flat, back = flat * mask, back * mask
                pre[n - 1] = pre[n - 1] + back.view_as(below)
                pre.append(torch.addmm(layer.bias, flat, layer.weight.t()))
            else:
                pre[n - 1] = torch.addmm(pre[n - 1], state[n], down)
                pre.append(torch.addmm(layer.bias, below, layer.weight.t()))
        return pre

    # -- learning ------------------------------------------------------------------
    def param_grads(self, clamped: Clamped, state: State) -> list[Tensor]:
        return self._forward_grads(clamped, state, state)

    def _mask(self, clamped: Clamped) -> Tensor | None:
        """The batch's dropout mask as the closed forms use it (None in eval mode)."""
        return clamped.mask if self.training and isinstance(clamped, ConvClamped) else None

    def _forward_indices(self, n: int, clamped: Clamped, below: Tensor) -> Tensor:
        """Pooling indices of ``P(w_n ⋆ below)`` (the first layer's are cached by :meth:`clamp`)."""
        if n == 0 and isinstance(clamped, ConvClamped) and clamped.indices is not None:
            return clamped.indices
        return self._conv_pool(n, below)[1]

    def _forward_grads(self, clamped: Clamped, state: State, post: State) -> list[Tensor]:
        """``(∂u/∂θ at state)^T · post`` for every forward weight and bias, batch mean, in
        :meth:`phi_parameters` order: with ``post = state`` it is ``∂Φ/∂θ`` (Φ is bilinear),
        with ``post = δ`` the vector-field rule."""
        n_conv = len(self.convs)
        inv_batch = 1.0 / clamped.x.shape[0]
        mask = self._mask(clamped)
        grads: list[Tensor] = []
        for n, conv in enumerate(self.convs):
            below = clamped.x if n == 0 else state[n - 1]
            unpooled = F.max_unpool2d(post[n], self._forward_indices(n, clamped, below), 2, 2,
                                      output_size=self.conv_shapes[n][1:])
            # (no autocast rule covers this op: under bf16 autocast the input x is float32)
            weight = torch.nn.grad.conv2d_weight(below, conv.weight.shape, unpooled.to(below.dtype),
                                                 conv.stride, conv.padding)
            # each pooled unit routes to exactly one position: Σ unpooled = Σ post^n
            grads += [weight.mul_(inv_batch), post[n].sum(dim=(0, 2, 3)).mul_(inv_batch)]
        for m in range(len(self.fcs)):
            n = n_conv + m
            below = state[n - 1].flatten(1)
            if m == 0 and mask is not None:
                below = below * mask
            grads += [torch.mm(post[n].t(), below).mul_(inv_batch), post[n].mean(dim=0)]
        return grads
