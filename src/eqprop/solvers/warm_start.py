"""Warm start: a training sample's free phase starts from its own steady state of the last epoch.

The weights move little between two visits of a sample, so its last free
steady state is close to the next one, and a solver that stops at a tolerance
needs fewer steps from there than from zero. The states are kept per training
sample in float16 on the run's device (``bytes`` says how much that is); a
sample not visited yet starts from the model's initial state. The store is
saved beside the checkpoint, so a resumed run starts exactly where it stopped.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models.base import EnergyModel, State

#: the stored states' type: 10 bits of mantissa keep a start within 1e-3 of the steady state it
#: came from, and the solver goes on from there
STORE_DTYPE = torch.float16


class WarmStart:
    """Per-sample free steady states of ``samples`` training samples, for the next epoch's starts."""

    def __init__(self, samples: int) -> None:
        self.samples = int(samples)
        self.layers: list[Tensor] = []           # per layer [samples, ...], allocated on first use
        self.seen: Tensor | None = None          # [samples] bool: has a stored state

    @property
    def bytes(self) -> int:
        """Memory held by the stored states."""
        return sum(t.numel() * t.element_size() for t in self.layers)

    def start(self, model: EnergyModel, x: Tensor, indices: Tensor) -> State:
        """The starting state of the batch ``x`` of training samples ``indices``."""
        initial = model.init_state(x)
        if not self.layers:
            return initial
        seen = self.seen[indices]
        return [torch.where(seen.view(-1, *[1] * (s.dim() - 1)), stored[indices].to(s.dtype), s)
                .contiguous(memory_format=_layout(s)) for s, stored in zip(initial, self.layers)]

    def keep(self, indices: Tensor, state: State) -> None:
        """Store the free steady states ``state`` of the training samples ``indices``."""
        if not self.layers:
            self.layers = [s.new_zeros((self.samples, *s.shape[1:]), dtype=STORE_DTYPE) for s in state]
            self.seen = torch.zeros(self.samples, dtype=torch.bool, device=state[0].device)
        for stored, s in zip(self.layers, state):
            stored[indices] = s.detach().to(STORE_DTYPE)
        self.seen[indices] = True

    def state_dict(self) -> dict[str, object]:
        return {"samples": self.samples, "layers": self.layers, "seen": self.seen}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if int(state["samples"]) != self.samples:
            raise ValueError(f"the warm-start states are of {state['samples']} samples, the run has {self.samples}")
        self.layers = list(state["layers"])
        self.seen = state["seen"]


def _layout(state: Tensor) -> torch.memory_format:
    """The memory format of a state tensor (a conv state may be channels-last)."""
    if state.dim() == 4 and not state.is_contiguous() and state.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
