"""BPTT's gradient split by time step, with one backward pass (SPEC §5).

The free dynamics run K steps with autograd from ``s_{T-K}`` to ``s_T``; the
loss is read at s_T (batch mean of ℓ, like the ``bptt`` estimator). Every step
runs with its own copy of the parameters (:func:`torch.func.functional_call`,
the clamped drive recomputed inside the step), so one ``autograd.grad`` call
returns, separately, each step's contribution to each parameter's gradient and
the gradient with respect to every intermediate state.

Indexing, t = 1..K counted back from T:

- ``neurons[n][t-1]`` = ∂L/∂s^n_{T-t+1}, per sample (the loss summed over the
  batch, so that it compares with EP's per-sample neuron updates);
- ``params[i][t-1]`` = the contribution of the t-th step counted back from T
  (the step ``s_{T-t} → s_{T-t+1}``); a head parameter's only term is the
  loss's own (∂ℓ/∂θ at s_T), counted at t = 1. ``params[i][:t].sum(0)`` is
  BPTT truncated to the last t steps; the sum over all K steps is the
  ``bptt`` estimator's gradient with ``bptt_steps=K``;
- ``sigma_prime[n][t-1]`` = σ'(u^n_{T-t}), the slope of the step that
  produced s_{T-t+1} (for comparisons in pre-activation space).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..models.base import EnergyModel, State


@dataclass
class BPTTSteps:
    """Per-step BPTT gradients (module docstring): lists per layer / parameter of ``[K, ...]`` tensors."""

    neurons: list[Tensor]
    params: list[Tensor]
    sigma_prime: list[Tensor]
    final_state: State
    loss: float


class _FreeStep(nn.Module):
    """One free step of ``model`` as a module call, so each step can take its own parameters."""

    def __init__(self, model: EnergyModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, state: State) -> State:
        return self.model.step(self.model.clamp(x), state)


def head_parameter_ids(model: EnergyModel) -> set[int]:
    """Identities of the head's parameters (not in the dynamics of the free phase)."""
    return {id(p) for p in model.head.parameters()}


def bptt_step_grads(model: EnergyModel, x: Tensor, target: Tensor, start: State, k: int) -> BPTTSteps:
    """Per-step BPTT gradients over the K free steps from ``start`` = s_{T-K} (one backward pass).

    Use in eval mode when the model has dropout (each step clamps the input again).
    """
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")
    params = model.trainable_parameters()
    head_ids = head_parameter_ids(model)
    stepper = _FreeStep(model)
    name_of = {id(p): name for name, p in stepper.named_parameters()}
    body = [p for p in params if id(p) not in head_ids]
    head = [p for p in params if id(p) in head_ids]
    copies = [[p.detach().clone().requires_grad_() for p in body] for _ in range(k)]
    with torch.enable_grad():
        states = [[s.detach() for s in start]]
        for i in range(k):
            weights = {name_of[id(p)]: c for p, c in zip(body, copies[i])}
            states.append(functional_call(stepper, weights, (x, states[-1])))
        losses = model.head.loss(states[-1][-1], target)
        loss = losses.mean()
        inputs = [s for step in states[1:] for s in step] + [c for step in copies for c in step] + head
        grads = list(torch.autograd.grad(loss, inputs, allow_unused=True))
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    layers, batch = len(start), x.shape[0]
    state_grads = grads[:k * layers]
    step_grads = grads[k * layers:k * layers + k * len(body)]
    head_grads = grads[k * layers + k * len(body):]
    # states[i + 1] (i = 0..K-1) is s_{T-K+i+1}: t = K - i
    neurons = [torch.stack([state_grads[(k - t) * layers + n] for t in range(1, k + 1)]).mul_(batch)
               for n in range(layers)]
    per_param: dict[int, Tensor] = {}
    for j, p in enumerate(body):
        per_param[id(p)] = torch.stack([step_grads[(k - t) * len(body) + j] for t in range(1, k + 1)])
    for p, g in zip(head, head_grads):
        trace = torch.zeros((k,) + tuple(p.shape), dtype=p.dtype, device=p.device)
        trace[0] = g
        per_param[id(p)] = trace
    with torch.no_grad():
        derivative = model.activation.derivative
        slopes = []
        for t in range(1, k + 1):
            below = states[k - t]  # s_{T-t}
            slopes.append([derivative(u) for u in model.preactivations(model.clamp(x), below)])
        sigma_prime = [torch.stack([slopes[t][n] for t in range(k)]) for n in range(layers)]
    final = [s.detach() for s in states[-1]]
    return BPTTSteps(neurons, [per_param[id(p)] for p in params], sigma_prime, final, float(loss.detach()))
