"""The dense products of a fully connected model that are not phase steps.

A P-MLP spends most of a training step outside its phases on two products:
the first layer's drive ``x W_1^T + b_1`` (once per batch) and each weight
gradient ``α left^T right``. :class:`DenseProducts` computes them with
PyTorch; a model's ``products`` attribute may hold a faster implementation
of the same two methods (eqprop's C kernel on the CPU,
:class:`~eqprop.cpu_kernels.KernelProducts`), which must give the same values
up to rounding and fall back to these where it does not apply.
"""
from __future__ import annotations

import torch
from torch import Tensor


class DenseProducts:
    """PyTorch's products (BLAS on the CPU, cuBLAS on CUDA); differentiable."""

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """``x weight^T + bias``: x ``[batch, in]``, weight ``[width, in]``, bias ``[width]``."""
        return torch.addmm(bias, x, weight.t())

    def outer(self, left: Tensor, right: Tensor, alpha: float) -> Tensor:
        """``alpha · left^T right``: left ``[batch, width]``, right ``[batch, in]``. The factor is
        the matmul's alpha (beta=0 ignores the input, so it need not even be filled): BLAS scales
        the product instead of a second pass."""
        return torch.addmm(left.new_empty(()), left.t(), right, beta=0.0, alpha=alpha)
