"""VF-CNN: the convolutional vector-field network (Laborieux 2021 §4.2).

The prototypical ConvNet of :mod:`.cnn` with its own backward kernels: for a
conv layer n+1 ≥ 2 the top-down term of s^n is

    ∂/∂s^n [s^{n+1} • P(B_{n+1} ⋆ s^n)] = B_{n+1}^T ⋆ P_B^{-1}(s^{n+1}),

the transposed convolution with B's kernel (same shape as w_{n+1}, no bias) of
the upper state max-unpooled with the arg-max indices of the pooling of
``B_{n+1} ⋆ s^n`` at the current state (as in the authors' VF ConvNet; with
B = w it is exactly the prototypical term). Fully connected layers use
``B_{n+1} s^{n+1}`` with B of the shape of W^T. No B for the first conv layer
(it faces the clamped input) nor for the softmax readout. Dropout is handled
as in :class:`PCNN`: the mask multiplies the flattened last conv state where it
feeds the first fc layer, and that layer's top-down term.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Clamped, State
from .cnn import PCNN
from .vf import VectorFieldModel, check_backward_options


class VFCNN(VectorFieldModel, PCNN):
    """Convolutional vector-field network (same arguments as :class:`PCNN` plus B's init).

    The forward weights and the head are drawn from ``generator`` first, exactly
    as in a :class:`PCNN` with the same seed; the backward weights after them.
    """

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int], kernels: Sequence[int],
                 strides: Sequence[int], paddings: Sequence[int], fc: Sequence[int],
                 activation: str = "half_hard_sigmoid", loss: str = "ce", nudge_inside: bool = True,
                 dropout: float = 0.0, generator: torch.Generator | None = None, init_scale: float = 1.0,
                 backward_init: str = "independent", backward_angle: float = 0.0,
                 dropout_generator: torch.Generator | None = None) -> None:
        check_backward_options(backward_init, backward_angle)
        super().__init__(input_shape, channels, kernels, strides, paddings, fc, activation=activation,
                         loss=loss, nudge_inside=nudge_inside, dropout=dropout, generator=generator,
                         init_scale=init_scale, dropout_generator=dropout_generator)
        n_conv = len(self.convs)
        spec = [("convs", n, False, n + 1) for n in range(1, n_conv)]
        spec += [("fcs", m, True, n_conv + m + 1) for m in range(len(self.fcs))]
        self._make_backward(spec)
        self.reset_backward_(generator, backward_init, backward_angle, init_scale)

    # -- the backward convolution --------------------------------------------------
    def _backward_indices(self, n: int, below: Tensor) -> Tensor:
        """Arg-max indices of ``P(B_n ⋆ below)`` (n counted from 0, n ≥ 1)."""
        conv = self.convs[n]
        b = self.backward["convs"][str(n)]
        return F.max_pool2d(F.conv2d(below, b, None, conv.stride, conv.padding), 2, 2, return_indices=True)[1]

    def _vf_back(self, n: int, below: Tensor, upper: Tensor) -> Tensor:
        """``B_n^T ⋆ P_B^{-1}(upper)``: the top-down term of s^{n-1} = ``below`` (n from 0)."""
        conv = self.convs[n]
        b = self.backward["convs"][str(n)]
        unpooled = F.max_unpool2d(upper, self._backward_indices(n, below), 2, 2,
                                  output_size=self.conv_shapes[n][1:])
        return F.conv_transpose2d(unpooled, b, None, conv.stride, conv.padding, self.output_paddings[n])

    # -- dynamics (PCNN.preactivations with B in the top-down terms) ---------------
    def _conv_terms(self, n: int, below: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        return F.max_pool2d(self.convs[n](below), 2, 2), self._vf_back(n, below, upper)

    def _fc_top_down_weight(self, m: int) -> Tensor:
        return self.backward["fcs"][str(m)].t()

    # -- learning ------------------------------------------------------------------
    def vector_field_grads(self, clamped: Clamped, state: State, delta: State) -> list[Tensor]:
        """``(∂u/∂θ at state)^T · delta`` with the pooling indices of ``state``.

        Forward conv w_n: δ^n unpooled with the forward pooling indices, correlated
        with s^{n-1}; backward conv B_n: s^n unpooled with the indices of
        ``P(B_n ⋆ s^{n-1})``, correlated with δ^{n-1}; fc as in :class:`VFMLP`.
        """
        n_conv = len(self.convs)
        inv_batch = 1.0 / clamped.x.shape[0]
        mask = self._mask(clamped)
        weight_grad = torch.nn.grad.conv2d_weight
        grads = self._forward_grads(clamped, state, delta)
        for n in range(1, n_conv):
            conv = self.convs[n]
            unpooled = F.max_unpool2d(state[n], self._backward_indices(n, state[n - 1]), 2, 2,
                                      output_size=self.conv_shapes[n][1:])
            grads.append(weight_grad(delta[n - 1], conv.weight.shape, unpooled, conv.stride,
                                     conv.padding).mul_(inv_batch))
        for m in range(len(self.fcs)):
            n = n_conv + m
            d = delta[n - 1].flatten(1)
            if m == 0 and mask is not None:
                d = d * mask
            grads.append(torch.mm(d.t(), state[n]).mul_(inv_batch))
        return grads
