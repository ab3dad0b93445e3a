""":class:`KernelProducts`: a fully connected model's drive and weight gradients by the C kernel.

The two products (:class:`~eqprop.models.products.DenseProducts`) split by
output rows across the kernel's threads, which are awake between the phases
anyway; on the development machine this made the 50x784x512 products of the
Laborieux MNIST preset faster than one PyTorch thread (see
``benchmarks/RESULTS.md``). Where the kernel does not apply (autograd through
the product, another device or floating type, or the kernel cannot be built)
PyTorch computes them.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..models.products import DenseProducts
from .library import Kernel, check_status, kernel_reads


class KernelProducts(DenseProducts):
    """The products by the kernel that ``kernel_for`` returns for a floating type (None: PyTorch),
    on ``threads`` threads."""

    def __init__(self, kernel_for: Callable[[torch.dtype], Kernel | None], threads: int) -> None:
        self.kernel_for = kernel_for
        self.threads = threads

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        kernel = self._kernel(x, weight, bias)
        if kernel is None or x.dim() != 2 or weight.dim() != 2 or bias.shape != weight.shape[:1] \
                or x.shape[1] != weight.shape[1]:
            return super().linear(x, weight, bias)
        x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
        out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
        status = kernel.linear(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(), x.shape[0],
                               weight.shape[0], x.shape[1], self.threads)
        check_status(status)
        return out

    def outer(self, left: Tensor, right: Tensor, alpha: float) -> Tensor:
        kernel = self._kernel(left, right)
        if kernel is None or left.dim() != 2 or right.dim() != 2 or left.shape[0] != right.shape[0]:
            return super().outer(left, right, alpha)
        left, right = left.contiguous(), right.contiguous()
        out = torch.empty(left.shape[1], right.shape[1], dtype=left.dtype)
        status = kernel.outer(left.data_ptr(), right.data_ptr(), out.data_ptr(), left.shape[0], left.shape[1],
                              right.shape[1], float(alpha), self.threads)
        check_status(status)
        return out

    def _kernel(self, *tensors: Tensor) -> Kernel | None:
        """The kernel, if it may compute a product of these tensors: all on the CPU in one of its
        floating types, and no gradient to record."""
        if not kernel_reads(tensors) or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return None
        return self.kernel_for(tensors[0].dtype)
