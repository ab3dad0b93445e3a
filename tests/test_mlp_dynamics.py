"""Closed-form P-MLP dynamics and parameter gradients against autograd of Φ and ℓ."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eqprop.models import EnergyModel, PMLP

SHAPES = [[7, 5], [7, 6, 4], [9, 8, 6, 5, 3]]


def random_setup(sizes, loss, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = PMLP(sizes, activation="scaled_sigmoid", loss=loss, generator=g).double()
    x = torch.rand(4, sizes[0], generator=g, dtype=torch.float64)
    state = [torch.rand(s.shape, generator=g, dtype=torch.float64) for s in model.init_state(x)]
    target = F.one_hot(torch.randint(0, sizes[-1], (4,), generator=g), sizes[-1]).double()
    return model, x, state, target


@pytest.mark.parametrize("sizes, loss", [(sizes, "mse") for sizes in SHAPES] +
                         [(sizes, "ce") for sizes in SHAPES if len(sizes) > 2])  # the readout needs a hidden layer
def test_preactivations_are_dphi_ds(sizes, loss):
    model, x, state, _ = random_setup(sizes, loss)
    clamped = model.clamp(x)
    closed = model.preactivations(clamped, state)
    auto = EnergyModel.preactivations(model, clamped, state)
    assert len(closed) == len(auto) == len(state)
    for c, a in zip(closed, auto):
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sizes", SHAPES)
def test_param_grads_are_dphi_dtheta(sizes):
    model, x, state, _ = random_setup(sizes, "mse")
    clamped = model.clamp(x)
    for c, a in zip(model.param_grads(clamped, state), EnergyModel.param_grads(model, clamped, state)):
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_head_nudge_and_grads_are_minus_beta_dloss(loss):
    model, x, state, target = random_setup([7, 6, 4], loss)
    beta = 0.3
    s_last = state[-1].clone().requires_grad_()
    params = list(model.head.parameters())
    loss_sum = model.head.loss(s_last, target).sum()
    (ds,) = torch.autograd.grad(loss_sum, [s_last])
    torch.testing.assert_close(model.head.nudge(state[-1], target, beta), -beta * ds)
    if params:
        mean_loss = model.head.loss(state[-1], target).mean()
        grads = torch.autograd.grad(mean_loss, params)
        for c, a in zip(model.head.param_grads(state[-1], target, beta), grads):
            torch.testing.assert_close(c, -beta * a)


def test_step_nudges_inside_or_outside_sigma():
    model, x, state, target = random_setup([7, 6, 4], "mse")
    clamped = model.clamp(x)
    beta = 0.5
    pre = model.preactivations(clamped, state)
    inside = model.step(clamped, state, beta, target)
    torch.testing.assert_close(inside[-1], model.activation.fn(pre[-1] + beta * (target - state[-1])))
    model.head.nudge_inside = False
    outside = model.step(clamped, state, beta, target)
    torch.testing.assert_close(outside[-1], model.activation.fn(pre[-1]) + beta * (target - state[-1]))
    torch.testing.assert_close(outside[0], inside[0])


@pytest.mark.parametrize("sizes", SHAPES)
def test_param_grads_difference_equals_difference_of_param_grads(sizes):
    model, x, state, _ = random_setup(sizes, "mse")
    other = [torch.rand_like(s) for s in state]
    clamped = model.clamp(x)
    expected = [a - b for a, b in zip(model.param_grads(clamped, other), model.param_grads(clamped, state))]
    for scale in (1.0, -2.5):
        for c, e in zip(model.param_grads_difference(clamped, other, state, scale), expected):
            torch.testing.assert_close(c, scale * e, rtol=1e-12, atol=1e-12)
        for c, e in zip(EnergyModel.param_grads_difference(model, clamped, other, state, scale), expected):
            torch.testing.assert_close(c, scale * e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["scaled_sigmoid", "hard_sigmoid", "half_hard_sigmoid", "tanh"])
@pytest.mark.parametrize("sizes, loss", [([7, 5], "mse"), ([7, 6, 4], "mse"), ([9, 8, 6, 5, 3], "mse"),
                                         ([7, 6, 4], "ce"), ([9, 8, 6, 3], "ce")])
@pytest.mark.parametrize("beta, inside", [(0.0, True), (0.4, True), (-0.3, True), (0.4, False)])
def test_fast_step_equals_sigma_of_dphi_ds(activation, sizes, loss, beta, inside):
    g = torch.Generator().manual_seed(1)
    model = PMLP(sizes, activation=activation, loss=loss, nudge_inside=inside, generator=g).double()
    x = torch.rand(3, sizes[0], generator=g, dtype=torch.float64)
    state = [torch.rand(s.shape, generator=g, dtype=torch.float64) for s in model.init_state(x)]
    target = F.one_hot(torch.tensor([0, 2, 1]), sizes[-1]).double()
    clamped = model.clamp(x)
    fast = model.step(clamped, state, beta, target)
    pre = EnergyModel.preactivations(model, clamped, state)   # autograd of Φ, not the closed form
    nudge = model.head.nudge(state[-1], target, beta) if beta != 0.0 else torch.zeros_like(pre[-1])
    if model.head.nudge_inside:   # the softmax readout always nudges inside σ
        pre[-1] = pre[-1] + nudge
    reference = [model.activation.fn(u) for u in pre]
    if not model.head.nudge_inside:
        reference[-1] = reference[-1] + nudge
    for a, b in zip(fast, reference):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["scaled_sigmoid", "hard_sigmoid", "tanh"])
@pytest.mark.parametrize("sizes", [[7, 5], [7, 6, 4], [9, 8, 6, 5, 3]])
@pytest.mark.parametrize("beta", [0.0, 0.4])
def test_in_place_step_without_autograd_matches_and_keeps_clamped(activation, sizes, beta):
    # without autograd σ overwrites the step's own preactivations; the clamped offsets
    # (a one-layer model's whole preactivation) must survive and the result must not change
    g = torch.Generator().manual_seed(2)
    model = PMLP(sizes, activation=activation, generator=g).double()
    x = torch.rand(3, sizes[0], generator=g, dtype=torch.float64)
    state = [torch.rand(s.shape, generator=g, dtype=torch.float64) for s in model.init_state(x)]
    target = F.one_hot(torch.tensor([0, 2, 1]), sizes[-1]).double()
    clamped = model.clamp(x)
    offsets = [o.clone() for o in clamped.offsets]
    with torch.no_grad():
        fast = model.step(clamped, model.step(clamped, state, beta, target), beta, target)
    reference = model.step(clamped, model.step(clamped, state, beta, target), beta, target)
    for a, b in zip(fast, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for o, kept in zip(clamped.offsets, offsets):
        torch.testing.assert_close(o, kept, rtol=0, atol=0)
