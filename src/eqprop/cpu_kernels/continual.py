"""The steps of continual EP's and continual VF's nudged phase in one call of the C kernel.

:func:`~eqprop.estimators.continual.telescoped_first_layer` runs K nudged steps,
each followed by the weights' move, in PyTorch: per step, a state step, the
update products and in-place adds, and the first layer's new drive, each a few
small kernels with the interpreter between them. Where the C kernel runs the
model's steps (a P-MLP or VF-MLP with the squared-error nudge, on the CPU, the
model's own update rules) and computes its products, :func:`continual_steps`
runs the same loop in one call (``eqprop_continual_phase`` in ``mlp_phase.c``):
the same updates in the same order, to rounding (sums are taken in another
order). Each update is made where its product is summed, so the per-step
update matrices are never stored.
"""
from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from torch import Tensor

from ..heads import SquaredError
from ..models.mlp import MLPClamped, PMLP
from ..models.vf import VFMLP
from .library import check_status
from .products import KernelProducts
from .runner import _CORES, _array, _pointers, kernel_applies


def continual_steps(model: PMLP, clamped: MLPClamped, state: list[Tensor], beta: float, target: Tensor,
                    steps: int, lrs: Sequence[float], rule: str, include: Tensor | None, mixing: Tensor | None,
                    totals: list[Tensor]) -> list[Tensor] | None:
    """The state after ``steps`` steps of the telescoped loop, having moved every parameter but
    the first layer's in place (``p += lr/β · update``) and added ``update/β`` to its entry of
    ``totals`` (aligned with ``model.trainable_parameters()``); None where the kernel does not
    run this phase (the caller then runs it in PyTorch). ``mixing``: the first layer's ``[B, B]``
    mixing matrix (None: it does not move)."""
    products = model.products
    if not (isinstance(products, KernelProducts) and type(model.head) is SquaredError
            and kernel_applies(model, clamped, state) and isinstance(beta, float) and beta != 0.0):
        return None
    if rule == "ep" and type(model).param_grads_difference is not PMLP.param_grads_difference:
        return None
    vector_field = rule == "vf"
    if vector_field and not (isinstance(model, VFMLP)
                             and type(model).vector_field_grads is VFMLP.vector_field_grads):
        return None
    dtype, batch = state[0].dtype, state[0].shape[0]
    kernel = products.kernel_for(dtype)
    sizes = [s.shape[1] for s in state]
    if kernel is None or target.shape != (batch, sizes[-1]) or len(model.layers) != len(sizes):
        return None
    params = model.trainable_parameters()
    index = {id(p): i for i, p in enumerate(params)}
    weights = [layer.weight for layer in model.layers]
    biases = [layer.bias for layer in model.layers]
    backward = ([None] + [model.backward["layers"][str(m)] for m in range(1, len(sizes))] if vector_field
                else [None] * len(sizes))
    moving = [*weights[1:], *biases[1:], *backward[1:]] if vector_field else [*weights[1:], *biases[1:]]
    if len(params) != len(moving) + 2 or any(id(p) not in index or not p.is_contiguous() or p.dtype != dtype
                                             for p in moving):
        return None   # parameters the kernel does not know of
    inv_beta = 1.0 / beta

    def rates(tensors: list[Tensor | None]) -> ctypes.Array:
        return _array(ctypes.c_double, [0.0 if t is None else lrs[index[id(t)]] * inv_beta for t in tensors])

    def total_of(tensors: list[Tensor | None]) -> list[Tensor | None]:
        return [None if t is None else totals[index[id(t)]] for t in tensors]

    # the top-down matrices: W_{n+1} itself (it moves with the weights), or copies of B^T kept in step
    top_down = [b.t().contiguous() for b in backward[1:]] if vector_field else weights[1:]
    out = [s.contiguous().clone() for s in state]
    betas = torch.full((batch,), beta, dtype=dtype)
    targets = target.to(dtype).contiguous()
    keep = None if include is None else include.to(dtype).contiguous()
    drive = clamped.drive.contiguous()
    mixing = None if mixing is None else mixing.to(dtype).contiguous()
    status = kernel.continual(
        len(sizes), _array(ctypes.c_int64, sizes), _pointers([None, *weights[1:]]), _pointers([None, *biases[1:]]),
        _pointers([*top_down, None]), _pointers(backward) if vector_field else None,
        model.activation.scale, model.activation.shift, _CORES[model.activation.kernel_core], betas.data_ptr(),
        targets.data_ptr(), int(model.head.nudge_inside), _pointers(out), drive.data_ptr(),
        None if mixing is None else mixing.data_ptr(), None if keep is None else keep.data_ptr(), batch,
        max(int(steps), 0), int(vector_field), rates([None, *weights[1:]]), rates([None, *biases[1:]]),
        rates(backward), inv_beta, _pointers(total_of([None, *weights[1:]])),
        _pointers(total_of([None, *biases[1:]])), _pointers(total_of(backward)) if vector_field else None,
        products.threads)
    check_status(status)
    return out
