"""Whole phases replayed as CUDA graphs.

A phase is T repetitions of the same few kernels. On a GPU the host can take
longer to issue a step (Python, then one launch per kernel) than the device
takes to run it, so the device idles between kernels. :class:`PhaseGraphs`
captures the T steps of a phase once, as one CUDA graph, and afterwards
replays them with a single launch.

A graph reads and writes fixed addresses, so each graph owns static copies of
its inputs: before a replay, the batch's clamped input (every tensor field of
the :class:`~eqprop.models.base.Clamped`, e.g. the first layer's drive or a
dropout mask), the starting state, the target and a per-sample β are copied
in, and the final state is cloned out. Parameters (and views of them that the
clamped input may hold) are read in place, so an
optimizer that updates them in place (all of ``torch.optim`` does) is seen by
the next replay. A model's step must therefore read nothing but its
parameters, the clamped input, the state, β and the target, and use no
autograd; a model says so with
:meth:`~eqprop.models.base.EnergyModel.supports_cuda_graphs`. The built-in
models do (a P-CNN's dropout mask is a field of its clamped input); a model
defined by Φ alone does not.
Phases of a model that does not are run eagerly.

One graph is captured per distinct (model, parameter addresses, steps, β,
input shapes and dtypes, train/eval mode, autocast); phases with autograd
enabled (BPTT's recorded steps) or on the CPU run eagerly through
:func:`~eqprop.dynamics.run_phase`.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import Tensor

from .dynamics import PhaseRunner, run_phase
from .models.base import Clamped, EnergyModel, State


def _tensor_leaves(value: Any) -> list[Tensor]:
    """The tensors of a clamped field: a tensor, or a list or tuple of them."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensor_leaves(item)]
    return []


def _structure(value: Any) -> Any:
    """A hashable description of a clamped field: tensors by shape, dtype and strides, the rest by value."""
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.stride())
    if isinstance(value, (list, tuple)):
        return tuple(_structure(item) for item in value)
    return value


def _aliases(tensors: list[Tensor]) -> tuple[int, ...]:
    """For each tensor, the index of its first occurrence in ``tensors`` (which inputs are one tensor)."""
    first: dict[int, int] = {}
    return tuple(first.setdefault(id(t), i) for i, t in enumerate(tensors))


def _rebuild(value: Any, tensors: list[Tensor]) -> Any:
    """``value`` with its tensors replaced, in order, by those popped from ``tensors``."""
    if isinstance(value, Tensor):
        return tensors.pop(0)
    if isinstance(value, (list, tuple)):
        return type(value)(_rebuild(item, tensors) for item in value)
    return value


@dataclasses.dataclass
class _Graph:
    """One captured phase: replay after copying the call's inputs into ``inputs``."""

    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor | None]   # static copies of the clamped tensors, the state, the target and β
                                  # (None: a parameter or a view of one, read in place, or a repeat
                                  # of an earlier input, copied once)
    outputs: State


class PhaseGraphs:
    """A drop-in replacement of :func:`~eqprop.dynamics.run_phase` that replays CUDA graphs.

    Call it with ``run_phase``'s arguments. ``warmup`` eager steps run on a side
    stream before each capture (cuDNN and cuBLAS choose their kernels there, as
    the capture must not allocate workspace for the first time).
    """

    def __init__(self, warmup: int = 3, max_graphs: int = 32, phase: PhaseRunner = run_phase) -> None:
        #: the eager phase that is captured (:func:`~eqprop.dynamics.run_alternating` for alternating sweeps)
        self.phase = phase
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, _Graph] = {}

    def __call__(self, model: EnergyModel, clamped: Clamped, state: State, steps: int,
                 beta: float | Tensor = 0.0, target: Tensor | None = None) -> State:
        if steps == 0 or not state[0].is_cuda or torch.is_grad_enabled() or not model.supports_cuda_graphs():
            return self.phase(model, clamped, state, steps, beta, target)
        fields = [getattr(clamped, f.name) for f in dataclasses.fields(clamped)]
        extras = [t for t in (target, beta) if isinstance(t, Tensor)]   # target, then a per-sample β
        inputs = _tensor_leaves(fields) + list(state) + extras
        key = (id(model), tuple(p.data_ptr() for p in model.parameters()), model.training, steps,
               None if isinstance(beta, Tensor) else float(beta), type(clamped), _structure(fields),
               _structure(list(state) + extras), _aliases(inputs), target is None,
               torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                # something changes from call to call (shapes, β, parameters re-allocated): keep the
                # memory bounded rather than hold a graph per call
                warnings.warn(f"PhaseGraphs: more than {self.max_graphs} distinct phases; dropping the "
                              "captured graphs", RuntimeWarning, stacklevel=2)
                self._graphs.clear()
            entry = self._capture(model, clamped, len(state), steps, beta, target, inputs)
            self._graphs[key] = entry
        for static, value in zip(entry.inputs, inputs):
            if static is not None:
                static.copy_(value)
        entry.graph.replay()
        return [s.clone() for s in entry.outputs]

    def _capture(self, model: EnergyModel, clamped: Clamped, n_state: int, steps: int,
                 beta: float | Tensor, target: Tensor | None, inputs: list[Tensor]) -> _Graph:
        # a clamped input may hold the weights themselves (the P-MLP's, looked up once per batch):
        # those are read in place like every parameter, not copied before each replay
        # and a tensor that appears twice (a drive that is also the first offset) gets one buffer and one copy
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        static: list[Tensor | None] = []
        pool: list[Tensor] = []
        buffers: dict[int, Tensor] = {}
        for t in inputs:
            if t.untyped_storage().data_ptr() in weights or id(t) in buffers:
                static.append(None)
                pool.append(buffers.get(id(t), t))
            else:
                buffers[id(t)] = t.detach().clone()
                static.append(buffers[id(t)])
                pool.append(buffers[id(t)])
        static_clamped = dataclasses.replace(clamped, **{f.name: _rebuild(getattr(clamped, f.name), pool)
                                                         for f in dataclasses.fields(clamped)})
        static_state = [pool.pop(0) for _ in range(n_state)]
        static_target = pool.pop(0) if target is not None else None
        static_beta = pool.pop(0) if isinstance(beta, Tensor) else beta

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warm = static_state
            for _ in range(min(self.warmup, steps)):
                warm = self.phase(model, static_clamped, warm, 1, static_beta, static_target)
        torch.cuda.current_stream().wait_stream(side)

        graph = torch.cuda.CUDAGraph()
        # an autocast cache would hand the graph weight casts made before the capture, which
        # later replays would never refresh: casts are recorded inside the graph instead
        with torch.autocast("cuda", torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                            cache_enabled=False):
            with torch.cuda.graph(graph):
                outputs = self.phase(model, static_clamped, static_state, steps, static_beta, static_target)
        return _Graph(graph, static, outputs)
