"""The interface every convergent RNN of eqprop implements.

Conventions (once, for the whole package): layers are indexed input first.
The input x = s^0 is clamped; the state is the list ``[s^1, ..., s^N]``;
``W_n`` maps s^{n-1} into s^n. Prototypical models derive their dynamics from
a scalar primitive Φ (SPEC §1): ``s_{t+1} = σ(∂Φ/∂s(x, s_t))``, all layers
updated synchronously from the state at step t.

A subclass must give :meth:`phi` and :meth:`init_state`. The default
:meth:`preactivations` and :meth:`param_grads` differentiate Φ with autograd,
so a user-defined model works with only Φ; the built-in models override both
with closed forms (no autograd per step), which tests check against Φ.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..activations import Activation
from ..heads import Head

State = list[Tensor]


@dataclasses.dataclass
class Clamped:
    """The clamped input of a batch, and what a model precomputes from it once.

    ``drive`` is the bottom-up input of the first layer (e.g. ``W_1 x + b_1``):
    it does not change from step to step, or from phase to phase, so models
    compute it once per batch instead of at every step.
    """

    x: Tensor
    drive: Tensor | None = None

    def repeat_batch(self, times: int) -> "Clamped":
        """The same clamped input for a batch repeated ``times`` times (phases run side by side):
        every tensor field is per sample (subclasses with shared fields override this)."""
        return dataclasses.replace(self, **{f.name: torch.cat([value] * times)
                                            for f in dataclasses.fields(self)
                                            if isinstance(value := getattr(self, f.name), Tensor)})


def is_free(beta: float | Tensor) -> bool:
    """True for the free dynamics: β is the number 0 (a per-sample β tensor is always nudged)."""
    return not isinstance(beta, Tensor) and beta == 0.0


class EnergyModel(nn.Module):
    """A prototypical (bidirectional) convergent RNN with primitive Φ and a head."""

    activation: Activation
    head: Head
    #: vector-field models (separate backward weights, no usable Φ) set this and define
    #: ``vector_field_grads``; the vector-field estimators and the GDU check rely on it
    is_vector_field: bool = False

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("activation", "head"):
                raise AttributeError(f"{type(self).__name__} has no {name}: set self.{name} in __init__, or "
                                     "subclass eqprop.PhiModel, which gives both a default") from None
            raise

    def forward(self, x: Tensor, steps: int = 30) -> Tensor:
        """Class scores of ``x`` after ``steps`` steps of the free phase from the initial state
        (``model(x)``; the papers' plain iteration, under ``torch.no_grad`` unless grad is on)."""
        clamped = self.clamp(x)
        state = self.init_state(x)
        for _ in range(steps):
            state = self.step(clamped, state)
        return self.logits(state)

    def fast_paths(self) -> frozenset[str]:
        """The fast paths this model's own code allows, by name (none here): ``"c_kernel"``
        (eqprop's C kernel computes its steps, :mod:`eqprop.cpu_kernels`) and
        ``"telescoped_first_layer"`` (continual EP updates the first layer's drive without a
        matmul per step). A subclass that overrides what a path relies on loses it."""
        return frozenset()

    def recurrent_weights(self) -> list[nn.Parameter]:
        """The weights that carry signals both ways (a W_n with a top-down role; for a
        vector-field model each W and its B): what KP-VF's leak applies to. None here."""
        return []

    def supports_cuda_graphs(self) -> bool:
        """True if :meth:`step` reads nothing but the parameters (updated in place), the
        clamped input, the state, β and the target, and uses no autograd: then
        :class:`~eqprop.cuda_graphs.PhaseGraphs` may capture a phase once and replay it.
        False here (a model defined by Φ alone steps through autograd); the built-in
        closed-form models say True."""
        return False

    # -- what a model must define -------------------------------------------------
    def init_state(self, x: Tensor) -> State:
        """The initial state s_0 for input ``x`` (zeros, like the papers)."""
        raise NotImplementedError

    def phi(self, x: Tensor, state: State) -> Tensor:
        """The primitive Φ(x, s) per sample, ``[B]`` (the head is not part of it)."""
        raise NotImplementedError

    def phi_parameters(self) -> list[nn.Parameter]:
        """The parameters Φ depends on, in the order of :meth:`param_grads`."""
        return [p for name, p in self.named_parameters() if not name.startswith("head.")]

    def layer_parameters(self) -> list[list[nn.Parameter]]:
        """Parameters grouped by layer, input first, the head's last (one learning rate each)."""
        raise NotImplementedError

    # -- dynamics ----------------------------------------------------------------
    def clamp(self, x: Tensor) -> Clamped:
        """Precompute what stays constant while ``x`` is clamped (see :class:`Clamped`)."""
        return Clamped(x)

    def refresh_clamped(self, clamped: Clamped) -> Clamped:
        """``clamped`` recomputed for the current weights, with the same batch and random draws
        (continual EP moves the weights while x stays clamped). Clamping again, here; a model
        whose :meth:`clamp` draws random numbers overrides this to keep them."""
        return self.clamp(clamped.x)

    def preactivations(self, clamped: Clamped, state: State) -> State:
        """``∂Φ/∂s^n`` for every layer, by autograd of :meth:`phi` (override with a closed form)."""
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            leaves = [s if s.requires_grad else s.detach().requires_grad_() for s in state]
            phi = self.phi(clamped.x, leaves).sum()
            return list(torch.autograd.grad(phi, leaves, create_graph=keep_graph))

    def step(self, clamped: Clamped, state: State, beta: float | Tensor = 0.0,
             target: Tensor | None = None) -> State:
        """One synchronous step ``s ← σ(∂Φ_β/∂s)``; β ≠ 0 adds the head's nudge.

        β is a number, or a ``[B, 1]`` tensor giving each sample its own β (symmetric EP
        runs its +β and -β phases side by side in one doubled batch).
        """
        pre = self.preactivations(clamped, state)
        sigma = self.activation.fn
        if is_free(beta):
            return [sigma(u) for u in pre]
        nudge = self.head.nudge(state[-1], target, beta)
        if self.head.nudge_inside:
            pre[-1] = pre[-1] + nudge
            return [sigma(u) for u in pre]
        new = [sigma(u) for u in pre]
        new[-1] = new[-1] + nudge
        return new

    def half_step(self, clamped: Clamped, state: State, parity: int, beta: float | Tensor = 0.0,
                  target: Tensor | None = None) -> State:
        """Update only the layers of index ``n % 2 == parity`` in the state (0: the first hidden
        layer), from ``state``; the others are kept as they are. Two half-steps make one sweep of
        :func:`~eqprop.dynamics.run_alternating`. This default takes a whole :meth:`step` and keeps
        the chosen layers (right for any model, but no cheaper than a step); layered models
        override it to compute only those layers."""
        new = self.step(clamped, state, beta, target)
        return [s_new if n % 2 == parity else s for n, (s_new, s) in enumerate(zip(new, state))]

    # -- learning ----------------------------------------------------------------
    def param_grads(self, clamped: Clamped, state: State) -> list[Tensor]:
        """``G(s) = ∂Φ/∂θ``, batch mean, aligned with :meth:`phi_parameters` (autograd default)."""
        params = self.phi_parameters()
        with torch.enable_grad():
            phi = self.phi(clamped.x, [s.detach() for s in state]).mean()
            grads = torch.autograd.grad(phi, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    def param_grads_difference(self, clamped: Clamped, second: State, first: State,
                               scale: float = 1.0) -> list[Tensor]:
        """``scale · (G(second) - G(first))``: what every EP estimate needs (override to share
        work, e.g. the clamped input is the same in both states, or to fold ``scale`` into it)."""
        differences = [a - b for a, b in zip(self.param_grads(clamped, second), self.param_grads(clamped, first))]
        return differences if scale == 1.0 else [d.mul_(scale) for d in differences]

    def nudged_param_grads(self, clamped: Clamped, state: State, beta: float,
                           target: Tensor) -> list[Tensor]:
        """``G_β(s) = ∂Φ_β/∂θ`` for all trainable parameters, in :meth:`trainable_parameters` order.

        Φ_β = Φ - βℓ: the head's parameters (if any) only appear through -βℓ.
        """
        grads = self.param_grads(clamped, state)
        if beta == 0.0:
            grads += [torch.zeros_like(p) for p in self.head.parameters()]
        else:
            grads += self.head.param_grads(state[-1], target, beta)
        return grads

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Φ's parameters then the head's: the order of every gradient list in eqprop."""
        return self.phi_parameters() + list(self.head.parameters())

    def logits(self, state: State) -> Tensor:
        """Class scores of a (steady) state."""
        return self.head.logits(state[-1])
