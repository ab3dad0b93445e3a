"""Continual EP and continual VF (SPEC §4): the update rule, its η → 0 limit, training semantics.

Float64 and small networks; the rule is checked against a manual loop written
from the SPEC, and C-VF against a stand-in vector-field model defined here
(when ``eqprop.models.vf`` exists, on its models too).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eqprop.dynamics import run_phase
from eqprop.estimators import Phases, build_estimator
from eqprop.estimators.continual import ContinualEP, ContinualVF, continual_nudged_phase
from eqprop.models import PMLP
from eqprop.models.base import Clamped, EnergyModel
from eqprop.models.cnn import PCNN

torch.set_num_threads(1)
PHASES = Phases(t1=60, t2=8, beta=0.1)


def small_mlp(loss: str = "ce", activation: str = "scaled_sigmoid", seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    model = PMLP([12, 10, 8, 4], activation=activation, loss=loss, generator=g).double()
    x = torch.rand(4, 12, generator=g, dtype=torch.float64)
    target = F.one_hot(torch.randint(0, 4, (4,), generator=g), 4).double()
    return model, x, target


def flat(tensors) -> Tensor:
    return torch.cat([t.flatten() for t in tensors])


def params_of(model) -> list[Tensor]:
    return [p.detach().clone() for p in model.trainable_parameters()]


def sgd(model, lrs, **kwargs):
    return torch.optim.SGD([{"params": g, "lr": lr} for g, lr in zip(model.layer_parameters(), lrs)],
                           lr=lrs[0], **kwargs)


def manual_c_ep(model: EnergyModel, x, target, phases: Phases, beta: float, lrs) -> list[Tensor]:
    """SPEC §4 written out: s_{t+1} = F_β(s_t, θ_t); θ += (η/β)(G_β(s_{t+1}) - G_{β_t}(s_t)), β_0 = 0."""
    lr_of = {id(p): lr for group, lr in zip(model.layer_parameters(), lrs) for p in group}
    params = model.trainable_parameters()
    with torch.no_grad():
        clamped = model.clamp(x)
        s = run_phase(model, clamped, model.init_state(x), phases.t1)
        total = [torch.zeros_like(p) for p in params]
        for t in range(phases.t2):
            nxt = model.step(clamped, s, beta, target)
            after = model.param_grads(clamped, nxt) + model.head.param_grads(nxt[-1], target, beta)
            before = model.param_grads(clamped, s) + (
                model.head.param_grads(s[-1], target, beta) if t > 0 else
                [torch.zeros_like(p) for p in model.head.parameters()])
            for p, a, b, acc in zip(params, after, before, total):
                update = (a - b) / beta
                acc += update
                p += lr_of[id(p)] * update
            clamped = model.clamp(x)   # W_1 x + b_1 with the new weights
            s = nxt
    return total


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_train_step_moves_weights_like_the_manual_loop(loss):
    model, x, target = small_mlp(loss)
    manual = copy.deepcopy(model)
    lrs = [0.05, 0.02, 0.01]   # three layers (mse: three in Φ; ce: two and the readout)
    before = params_of(model)
    estimator = build_estimator("c_ep", PHASES)
    result = estimator.train_step(model, x, target, sgd(model, lrs))
    manual_total = manual_c_ep(manual, x, target, PHASES, PHASES.beta, lrs)
    for p, q in zip(model.trainable_parameters(), manual.trainable_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13)
    for d, m in zip(result.direction, manual_total):
        torch.testing.assert_close(d, m, rtol=1e-10, atol=1e-12)
    # the weights moved by lr x (sum of the per-step updates), and really moved
    lr_of = {id(p): lr for g, lr in zip(model.layer_parameters(), lrs) for p in g}
    for p, p0, d in zip(model.trainable_parameters(), before, result.direction):
        torch.testing.assert_close(p - p0, lr_of[id(p)] * d, rtol=1e-9, atol=1e-14)
        assert float((p - p0).detach().abs().max()) > 1e-6


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_vanishing_lr_gives_one_sided_ep(loss):
    model, x, target = small_mlp(loss)
    one_sided = flat(build_estimator("one_sided", PHASES).estimate(model, x, target).direction)
    frozen = flat(ContinualEP(PHASES).estimate(model, x, target).direction)        # η = 0 exactly
    tiny = flat(ContinualEP(PHASES, lr=1e-10).estimate(model, x, target).direction)
    torch.testing.assert_close(frozen, one_sided, rtol=1e-11, atol=1e-13)   # telescoping sum
    assert float((tiny - one_sided).norm() / one_sided.norm()) < 1e-8
    # a real learning rate changes the estimate, by O(η) (the weights drift during the phase)
    drift = {}
    for lr in (1e-4, 1e-3):
        moved = flat(ContinualEP(PHASES, lr=lr).estimate(model, x, target).direction)
        drift[lr] = float((moved - one_sided).norm() / one_sided.norm())
    assert 1e-3 < drift[1e-3] < 0.2, drift
    assert 7 < drift[1e-3] / drift[1e-4] < 13, drift


def test_estimate_leaves_the_model_unchanged():
    model, x, target = small_mlp("ce")
    before = params_of(model)
    ContinualEP(PHASES, lr=[0.5, 0.5, 0.5]).estimate(model, x, target)
    for p, q in zip(model.trainable_parameters(), before):
        assert torch.equal(p, q)


def test_estimate_uses_the_rates_of_the_last_train_step():
    model, x, target = small_mlp("ce")
    estimator = ContinualEP(PHASES)
    lrs = [0.05, 0.02, 0.01]
    probe = copy.deepcopy(model)
    estimator.train_step(model, x, target, sgd(model, lrs))
    implicit = flat(estimator.estimate(probe, x, target).direction)
    explicit = flat(ContinualEP(PHASES).estimate(probe, x, target, lr=lrs).direction)
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)
    frozen = flat(ContinualEP(PHASES).estimate(probe, x, target).direction)   # η = 0
    assert not torch.allclose(implicit, frozen)


def test_learning_rate_schedules_apply():
    model, x, target = small_mlp("ce")
    other = copy.deepcopy(model)
    optimizer = sgd(model, [0.05, 0.02, 0.01])
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5)  # halves every group's lr
    build_estimator("c_ep", PHASES).train_step(model, x, target, optimizer)
    build_estimator("c_ep", PHASES).train_step(other, x, target, sgd(other, [0.025, 0.01, 0.005]))
    for p, q in zip(model.trainable_parameters(), other.trainable_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["c_ep", "c_vf"])
def test_weight_decay_shrinks_every_weight_once_per_batch(kind):
    model, x, target = fc_model(kind, "mse")
    decayed = copy.deepcopy(model)
    lrs, decay = [0.05, 0.02, 0.01], 0.3
    build_estimator(kind, PHASES).train_step(model, x, target, sgd(model, lrs))
    optimizer = sgd(decayed, lrs, weight_decay=decay)
    build_estimator(kind, PHASES).train_step(decayed, x, target, optimizer)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for p, q in zip(model.trainable_parameters(), decayed.trainable_parameters()):
        torch.testing.assert_close(q, p * (1 - lr_of[id(q)] * decay), rtol=1e-12, atol=0)


@pytest.mark.parametrize("make, message", [
    (lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9), "momentum"),
    (lambda params: torch.optim.Adam(params, lr=0.1), "Adam"),
])
def test_refuses_what_plain_sgd_steps_cannot_honour(make, message):
    model, x, target = small_mlp("ce")
    before = params_of(model)
    with pytest.raises(ValueError, match=message):
        build_estimator("c_ep", PHASES).train_step(model, x, target, make(model.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(model.trainable_parameters(), before))


def test_random_sign_draws_both_signs_from_its_generator():
    model, x, target = small_mlp("ce")
    estimator = build_estimator("c_ep", PHASES, torch.Generator().manual_seed(0), random_sign=True)
    assert {estimator.beta() > 0 for _ in range(40)} == {True, False}
    assert ContinualEP.config_fields == ("random_sign",)
    plus = flat(build_estimator("one_sided", PHASES).estimate(model, x, target).direction)
    minus = flat(build_estimator("one_sided", Phases(PHASES.t1, PHASES.t2, -PHASES.beta))
                 .estimate(model, x, target).direction)
    seen = set()
    for _ in range(8):
        drawn = flat(estimator.estimate(model, x, target).direction)
        if torch.allclose(drawn, plus, rtol=1e-11, atol=1e-13):
            seen.add("+")
        else:
            torch.testing.assert_close(drawn, minus, rtol=1e-11, atol=1e-13)
            seen.add("-")
    assert seen == {"+", "-"}
    # the same generator seed draws the same signs
    a = build_estimator("c_ep", PHASES, torch.Generator().manual_seed(5), random_sign=True)
    b = build_estimator("c_ep", PHASES, torch.Generator().manual_seed(5), random_sign=True)
    assert [a.beta() for _ in range(10)] == [b.beta() for _ in range(10)]


def test_registered_and_refuses_zero_beta():
    from eqprop.estimators import ESTIMATORS
    assert ESTIMATORS["c_ep"] is ContinualEP and ESTIMATORS["c_vf"] is ContinualVF
    with pytest.raises(ValueError, match="nonzero"):
        ContinualEP(Phases(10, 5, 0.0))


def test_p_cnn_with_dropout_keeps_its_mask_and_matches_one_sided_at_zero_lr():
    g = torch.Generator().manual_seed(0)
    model = PCNN((1, 12, 12), [4, 8], [3, 3], [1, 1], [1, 1], [10], activation="scaled_sigmoid",
                 loss="ce", dropout=0.3, generator=g).double()
    x = torch.rand(3, 1, 12, 12, generator=g, dtype=torch.float64)
    target = F.one_hot(torch.randint(0, 10, (3,), generator=g), 10).double()
    phases = Phases(40, 5, 0.1)
    model.dropout_generator = torch.Generator().manual_seed(7)
    one_sided = flat(build_estimator("one_sided", phases).estimate(model, x, target).direction)
    model.dropout_generator = torch.Generator().manual_seed(7)
    frozen = flat(ContinualEP(phases).estimate(model, x, target).direction)
    torch.testing.assert_close(frozen, one_sided, rtol=1e-10, atol=1e-13)
    # training with moving weights: one mask per batch (one draw), all the dynamics see it
    model.dropout_generator = torch.Generator().manual_seed(7)
    masks = []
    step = model.step

    def recording_step(clamped, state, beta=0.0, target=None):
        masks.append(clamped.mask)
        return step(clamped, state, beta, target)

    model.step = recording_step
    before = params_of(model)
    result = ContinualEP(phases).train_step(model, x, target, sgd(model, [0.05, 0.05, 0.05]))
    assert all(torch.equal(m, masks[0]) for m in masks) and len(masks) == phases.t1 + phases.t2
    reference = torch.Generator().manual_seed(7)
    torch.empty(3, model.features, dtype=torch.float64).bernoulli_(0.7, generator=reference)
    assert torch.equal(model.dropout_generator.get_state(), reference.get_state())
    assert all(torch.isfinite(d).all() for d in result.direction)
    assert any(not torch.equal(p, q) for p, q in zip(model.trainable_parameters(), before))


# -- C-VF ---------------------------------------------------------------------------------
class StandInVF(EnergyModel):
    """A minimal vector-field MLP with the interface of ``eqprop.models.vf``:
    ``s^n ← σ(W_n s^{n-1} + b_n + B_{n+1} s^{n+1})``, squared error, nudge inside σ."""

    is_vector_field = True

    def __init__(self, sizes, generator):
        super().__init__()
        from eqprop.activations import get_activation
        from eqprop.heads import make_head
        self.activation = get_activation("scaled_sigmoid")
        self.head = make_head("mse", sizes[-1], sizes[-1], True)
        self.forward_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.backward_weights = nn.ParameterList(
            nn.Parameter(0.5 * torch.randn(a, b, generator=generator)) for a, b in zip(sizes[1:-1], sizes[2:]))
        for layer in self.forward_layers:
            nn.init.normal_(layer.weight, std=0.5, generator=generator)
            nn.init.normal_(layer.bias, std=0.1, generator=generator)

    def phi(self, x, state):
        raise TypeError("a vector-field model has no primitive Φ")

    def init_state(self, x):
        return [x.new_zeros(x.shape[0], layer.out_features) for layer in self.forward_layers]

    def trainable_parameters(self):
        out = []
        for n, layer in enumerate(self.forward_layers):
            out += [layer.weight, layer.bias]
            if n < len(self.backward_weights):
                out.append(self.backward_weights[n])
        return out

    def layer_parameters(self):
        groups = [[layer.weight, layer.bias] for layer in self.forward_layers]
        for n, b in enumerate(self.backward_weights):   # B_{n+2} shares the rate of W_{n+2}
            groups[n + 1].append(b)
        return groups

    def clamp(self, x):
        return Clamped(x, self.forward_layers[0](x))

    def preactivations(self, clamped, state):
        pre = []
        for n, layer in enumerate(self.forward_layers):
            u = clamped.drive if n == 0 else layer(state[n - 1])
            if n < len(self.backward_weights):
                u = u + state[n + 1] @ self.backward_weights[n].t()
            pre.append(u)
        return pre

    def vector_field_grads(self, clamped, state, delta):
        batch = clamped.x.shape[0]
        grads = []
        for n in range(len(self.forward_layers)):
            below = clamped.x if n == 0 else state[n - 1]
            grads += [delta[n].t() @ below / batch, delta[n].mean(0)]
            if n < len(self.backward_weights):
                grads.append(delta[n].t() @ state[n + 1] / batch)
        return grads


def stand_in_vf():
    model = StandInVF([6, 7, 5, 3], torch.Generator().manual_seed(1)).double()
    W = [layer.weight for layer in model.forward_layers]
    b = [layer.bias for layer in model.forward_layers]
    # B mirroring W_{n+1} (maps s^{n+1} into s^n), keyed by the forward layer's input-first number
    return model, W, b, {n + 2: p for n, p in enumerate(model.backward_weights)}


def package_vf_mlp():
    from eqprop.models.vf import VFMLP
    model = VFMLP([6, 7, 5, 3], generator=torch.Generator().manual_seed(1)).double()
    W = [layer.weight for layer in model.layers]
    b = [layer.bias for layer in model.layers]
    return model, W, b, {pair.layer: pair.backward for pair in model.backward_pairs()}


@pytest.mark.parametrize("make", [stand_in_vf, package_vf_mlp], ids=["stand-in", "VFMLP"])
def test_c_vf_moves_w_b_and_backward_weights_by_the_per_step_rule(make):
    model, _, _, _ = make()
    manual, W, b, B = make()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 6, generator=g, dtype=torch.float64)
    target = F.one_hot(torch.randint(0, 3, (3,), generator=g), 3).double()
    phases = Phases(80, 6, 0.2)
    lrs = [0.03, 0.02, 0.01]
    before = params_of(model)
    ContinualVF(phases).train_step(model, x, target, sgd(model, lrs))
    # SPEC §4 written per weight, input-first: ΔW_n = (η_n/β)(s^n_{t+1} - s^n_t)(s^{n-1}_t)^T,
    # Δb_n = (η_n/β)(s^n_{t+1} - s^n_t), ΔB_{n+1} = (η_{n+1}/β)(s^n_{t+1} - s^n_t)(s^{n+1}_t)^T
    beta = phases.beta
    with torch.no_grad():
        s = run_phase(manual, manual.clamp(x), manual.init_state(x), phases.t1)
        for _ in range(phases.t2):
            nxt = manual.step(manual.clamp(x), s, beta, target)
            d = [a - c for a, c in zip(nxt, s)]
            for n in range(1, 4):            # layer n: W_n, b_n; state index n - 1
                below = x if n == 1 else s[n - 2]
                W[n - 1] += lrs[n - 1] / beta * d[n - 1].t() @ below / 3
                b[n - 1] += lrs[n - 1] / beta * d[n - 1].mean(0)
                if n + 1 in B:
                    B[n + 1] += lrs[n] / beta * d[n - 1].t() @ s[n] / 3
            s = nxt
    for p, q in zip(model.trainable_parameters(), manual.trainable_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13)
    assert all(not torch.equal(p, q) for p, q in zip(model.trainable_parameters(), before))
    # estimate() leaves the model as it was
    frozen = copy.deepcopy(manual)
    ContinualVF(phases, lr=0.1).estimate(frozen, x, target)
    assert all(torch.equal(p, q) for p, q in zip(frozen.trainable_parameters(), manual.trainable_parameters()))


def test_c_vf_refuses_a_model_without_vector_field_grads():
    model, x, target = small_mlp("mse")
    with pytest.raises(TypeError, match="vector"):
        ContinualVF(PHASES).estimate(model, x, target)


def test_continual_phase_records_per_step_updates_that_sum_to_the_direction():
    model, x, target = small_mlp("ce")
    lrs = [0.01] * len(model.trainable_parameters())
    with torch.no_grad():
        clamped = model.clamp(x)
        free = run_phase(model, clamped, model.init_state(x), PHASES.t1)
        result = continual_nudged_phase(model, clamped, free, PHASES.beta, target, PHASES.t2, lrs, record=True)
    assert len(result.param_steps) == PHASES.t2 and len(result.neuron_steps) == PHASES.t2
    for i, total in enumerate(result.direction):
        torch.testing.assert_close(sum(step[i] for step in result.param_steps), total, rtol=1e-12, atol=1e-14)
    for n, s in enumerate(result.state):
        torch.testing.assert_close(free[n] + PHASES.beta * sum(step[n] for step in result.neuron_steps), s,
                                   rtol=1e-12, atol=1e-13)


# -- the telescoped first layer of fully connected models ----------------------------------
def fc_model(kind: str, loss: str, activation: str = "scaled_sigmoid", nudge_inside: bool = True):
    """A float64 P-MLP (c_ep) or VF-MLP (c_vf), dropout-free, batch 9 (wider than the 8- and
    4-unit layers, which use the transposed matmul), and a batch of data."""
    from eqprop.models.vf import VFMLP
    g = torch.Generator().manual_seed(11)
    cls = PMLP if kind == "c_ep" else VFMLP
    model = cls([12, 10, 8, 4], activation=activation, loss=loss, nudge_inside=nudge_inside,
                generator=g).double()
    x = torch.rand(9, 12, generator=g, dtype=torch.float64)
    target = F.one_hot(torch.randint(0, 4, (9,), generator=g), 4).double()
    return model, x, target


def assert_relative(actual, expected, rtol=1e-12):
    """Every tensor within ``rtol`` of the largest entry of its reference."""
    for a, e in zip(actual, expected, strict=True):
        error = float((a - e).detach().abs().max() / e.detach().abs().max())
        assert error <= rtol, error


#: the directions are state changes over β, which amplifies rounding: the per-step path itself
#: moves its directions by up to ~3e-12 (relative) when every weight changes by one ulp
DIRECTION_RTOL = 1e-11


FAST_CASES = [(kind, loss, sign) for kind in ("c_ep", "c_vf") for loss in ("mse", "ce")
              for sign in (False, True)]


@pytest.mark.parametrize("kind, loss, random_sign", FAST_CASES)
def test_telescoped_first_layer_trains_like_the_per_step_path(kind, loss, random_sign):
    model, x, target = fc_model(kind, loss)
    reference = copy.deepcopy(model)
    phases = Phases(40, 8, 0.1)
    fast = build_estimator(kind, phases, torch.Generator().manual_seed(1), random_sign=random_sign)
    slow = build_estimator(kind, phases, torch.Generator().manual_seed(1), random_sign=random_sign)
    slow.telescope_first_layer = False
    if random_sign:   # seed 1 draws both signs in the three batches below
        signs = build_estimator(kind, phases, torch.Generator().manual_seed(1), random_sign=True)
        assert {signs.beta() > 0 for _ in range(3)} == {True, False}
    lrs = [0.05, 0.02, 0.01]
    opt_fast, opt_slow = sgd(model, lrs), sgd(reference, lrs)
    before = params_of(model)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):   # the weights after each batch feed the next
        xb = x + 0.1 * torch.rand(x.shape, generator=g, dtype=x.dtype)
        a = fast.train_step(model, xb, target, opt_fast)
        b = slow.train_step(reference, xb, target, opt_slow)
        assert_relative(a.direction, b.direction, DIRECTION_RTOL)
        assert_relative(model.trainable_parameters(), reference.trainable_parameters())
        assert_relative(a.free_state, b.free_state)
    assert all(not torch.equal(p, q) for p, q in zip(model.trainable_parameters(), before))
    # estimate(): η → 0 (frozen weights) and a real η, the model left unchanged
    fast.random_sign = slow.random_sign = False
    for lr in (0.0, [0.05, 0.02, 0.01]):
        a = fast.estimate(model, x, target, lr=lr)
        b = slow.estimate(model, x, target, lr=lr)
        assert_relative(a.direction, b.direction, DIRECTION_RTOL)
    assert_relative(model.trainable_parameters(), reference.trainable_parameters())


@pytest.mark.parametrize("kind", ["c_ep", "c_vf"])
@pytest.mark.parametrize("activation, nudge_inside", [("tanh", True), ("hard_sigmoid", False),
                                                      ("scaled_sigmoid", False)])
def test_telescoped_first_layer_with_other_activations_and_rates(kind, activation, nudge_inside):
    # σ with (scale, shift) = (1, 0) keeps the drive itself as the offset; per-parameter rates,
    # a frozen first layer, and a first layer moving alone
    for lrs in ([0.04, 0.03, 0.02], [0.0, 0.03, 0.02], [0.04, 0.0, 0.0]):
        model, x, target = fc_model(kind, "mse", activation, nudge_inside)
        reference = copy.deepcopy(model)
        fast = build_estimator(kind, Phases(40, 6, -0.2))
        slow = build_estimator(kind, Phases(40, 6, -0.2))
        slow.telescope_first_layer = False
        a = fast.train_step(model, x, target, sgd(model, lrs))
        b = slow.train_step(reference, x, target, sgd(reference, lrs))
        assert_relative(a.direction, b.direction, DIRECTION_RTOL)
        assert_relative(model.trainable_parameters(), reference.trainable_parameters())


@pytest.mark.parametrize("kind, loss", [("c_ep", "mse"), ("c_vf", "ce")])
def test_telescoped_first_layer_clamps_once_and_ends_with_the_refreshed_drive(kind, loss):
    from eqprop.estimators.continual import first_layer_telescopes
    from eqprop.estimators.vf import vector_field_grads
    model, x, target = fc_model(kind, loss)
    reference = copy.deepcopy(model)
    rule = "ep" if kind == "c_ep" else "vf"
    lrs = [0.05] * len(model.trainable_parameters())
    clamps = []
    clamp = model.clamp

    def counting_clamp(inputs):
        clamps.append(inputs)
        return clamp(inputs)

    model.clamp = counting_clamp
    with torch.no_grad():
        clamped = clamp(x)
        assert first_layer_telescopes(model, clamped)
        free = run_phase(model, clamped, model.init_state(x), 40)
        fast = continual_nudged_phase(model, clamped, free, 0.1, target, 8, lrs, rule)
        slow = continual_nudged_phase(reference, reference.clamp(x), free, 0.1, target, 8, lrs, rule,
                                      telescope=False)
    assert clamps == []    # no re-clamp: the drive follows the Gram matrix
    assert_relative(fast.direction, slow.direction, DIRECTION_RTOL)
    assert_relative(fast.state, slow.state)
    assert_relative(fast.clamped.offsets + [fast.clamped.drive], slow.clamped.offsets + [slow.clamped.drive])
    for a, b in zip(fast.clamped.offsets, slow.clamped.offsets):
        assert a.shape == b.shape
    assert fast.clamped.transposed == slow.clamped.transposed == [False, True, True][:len(free)]
    # clamped_from_drive rebuilds model.clamp exactly from the drive
    fresh = clamp(x)
    rebuilt = model.clamped_from_drive(x, fresh.drive, fresh.transposed)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.offsets, fresh.offsets))
    # record, or another vector-field rule, take the generic path (which re-clamps)
    with torch.no_grad():
        continual_nudged_phase(model, clamp(x), free, 0.1, target, 3, lrs, rule, record=True)
        assert len(clamps) == 3
        if rule == "vf":
            continual_nudged_phase(model, clamp(x), free, 0.1, target, 2, lrs, rule,
                                   vf_grads=lambda *args: vector_field_grads(*args))
            assert len(clamps) == 5


def test_only_fully_connected_models_telescope():
    from eqprop.estimators.continual import first_layer_telescopes
    model, x, _ = fc_model("c_vf", "mse")
    assert first_layer_telescopes(model, model.clamp(x))
    assert not first_layer_telescopes(model, Clamped(x, model.clamp(x).drive))
    stand_in, _, _, _ = stand_in_vf()
    assert not first_layer_telescopes(stand_in, stand_in.clamp(torch.rand(2, 6, dtype=torch.float64)))
    cnn = PCNN((1, 8, 8), [4], [3], [1], [1], [10], generator=torch.Generator().manual_seed(0)).double()
    assert not first_layer_telescopes(cnn, cnn.clamp(torch.rand(2, 1, 8, 8, dtype=torch.float64)))

    class ClampedDifferently(PMLP):
        def clamp(self, inputs):
            return super().clamp(inputs)

    other = ClampedDifferently([12, 10, 4], generator=torch.Generator().manual_seed(0)).double()
    assert not first_layer_telescopes(other, other.clamp(x))


def authors_vfdisc_train_step(W1, b1, W2, b2, B2, x, y, beta, t1, t2, lr_out, lr_hidden, learn_b1=True):
    """One C-VF batch of the authors' discrete VF network (ernoult/continualEP, ``VFdisc``: ``stepper``,
    ``computeGradients``, ``updateWeights``) written out for one hidden layer, the output layer first
    as there: s0 output, s1 hidden. The nudge is added after σ, the division is by the signed β, and
    B (their ``w[1]``) uses the output layer's rate (``lr_tab[floor(i/2)]``). Their code leaves the
    hidden bias b1 (the bias of ``w[-1]``) unchanged (``learn_b1=False``); SPEC §4 updates it."""
    rho = lambda u: torch.sigmoid(4 * (u - 0.5))  # noqa: E731
    s0, s1 = x.new_zeros(x.shape[0], W2.shape[0]), x.new_zeros(x.shape[0], W1.shape[0])
    step = lambda s0, s1, beta: (rho(s1 @ W2.t() + b2) + beta * (y - s0),  # noqa: E731
                                 rho(x @ W1.t() + b1 + s0 @ B2.t()))
    for _ in range(t1):
        s0, s1 = step(s0, s1, 0.0)
    for _ in range(t2):
        n0, n1 = step(s0, s1, beta)
        c = 1 / (beta * x.shape[0])
        gW2, gb2, gB2 = c * (n0 - s0).t() @ s1, c * (n0 - s0).sum(0), c * (n1 - s1).t() @ s0
        gW1, gb1 = c * (n1 - s1).t() @ x, c * (n1 - s1).sum(0)
        W2 += lr_out * gW2
        b2 += lr_out * gb2
        B2 += lr_out * gB2
        W1 += lr_hidden * gW1
        if learn_b1:
            b1 += lr_hidden * gb1
        s0, s1 = n0, n1


@pytest.mark.parametrize("telescope", [True, False])
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("learn_b1", [True, False])
def test_c_vf_follows_the_authors_discrete_vf_code(telescope, sign, learn_b1):
    """The cvf-1h convention (nudge after σ, signed β, B at W_2's rate) against the authors' code;
    ``optim.frozen: [layers.0.bias]`` is their code exactly."""
    from eqprop.build import build_optimizer
    from eqprop.config import OptimConfig
    from eqprop.models.vf import VFMLP
    g = torch.Generator().manual_seed(4)
    model = VFMLP([9, 7, 4], nudge_inside=False, generator=g, backward_init="flipped",
                  backward_angle=40.0).double()
    x = torch.rand(5, 9, generator=g, dtype=torch.float64)
    y = F.one_hot(torch.randint(0, 4, (5,), generator=g), 4).double()
    lrs, phases = [0.3, 0.2], Phases(30, 6, 0.2)
    with torch.no_grad():
        W1, b1, W2, b2 = (p.detach().clone() for p in (model.layers[0].weight, model.layers[0].bias,
                                                        model.layers[1].weight, model.layers[1].bias))
        B2 = model.backward["layers"]["1"].detach().clone()
        authors_vfdisc_train_step(W1, b1, W2, b2, B2, x, y, sign * phases.beta, phases.t1, phases.t2,
                                  lr_out=lrs[1], lr_hidden=lrs[0], learn_b1=learn_b1)
    estimator = ContinualVF(phases)
    estimator.telescope_first_layer = telescope
    estimator.beta = lambda: sign * phases.beta
    frozen = [] if learn_b1 else ["layers.0.bias"]
    estimator.train_step(model, x, y, build_optimizer(OptimConfig(lr=lrs, frozen=frozen), model))
    ours = [model.layers[0].weight, model.layers[0].bias, model.layers[1].weight, model.layers[1].bias,
            model.backward["layers"]["1"]]
    for p, q in zip(ours, (W1, b1, W2, b2, B2)):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_config_refuses_compile_for_estimators_that_move_the_weights():
    from eqprop.config import ConfigError, validate_config
    from eqprop.presets import load_preset
    data = load_preset("cep-1h")
    data["train"]["compile"] = True
    with pytest.raises(ConfigError, match="train.compile"):
        validate_config(data)


@pytest.mark.parametrize("kind", ["c_ep", "c_vf"])
@pytest.mark.parametrize("telescope", [True, False])
def test_settle_tol_leaves_unsettled_samples_out_of_the_updates(kind, telescope):
    model, x, target = fc_model(kind, "mse")
    reference = copy.deepcopy(model)
    phases = Phases(3, 6, 0.2)   # a free phase too short for every sample to settle
    probe = build_estimator(kind, phases)
    _, stats = probe.free_phase(model, model.clamp(x))
    tol = float(stats.residual.median())
    settled = stats.residual <= tol
    assert 0 < int(settled.sum()) < x.shape[0]
    lrs = [0.05, 0.02, 0.01]   # every layer moves
    gated = build_estimator(kind, phases, settle_tol=tol)
    gated.telescope_first_layer = telescope
    result = gated.train_step(model, x, target, sgd(model, lrs))
    assert int(result.nudged_stats.excluded) == int((~settled).sum())
    # the settled samples alone, their batch mean rescaled to the whole batch's
    share = float(settled.sum()) / x.shape[0]
    alone = build_estimator(kind, phases)
    alone.telescope_first_layer = telescope
    expected = alone.train_step(reference, x[settled], target[settled], sgd(reference, [lr * share for lr in lrs]))
    assert_relative(result.direction, [share * d for d in expected.direction], DIRECTION_RTOL)
    assert_relative(model.trainable_parameters(), reference.trainable_parameters())


def test_settle_tol_is_validated_and_needs_a_readout_without_parameters():
    from eqprop.config import ConfigError, validate_config
    from eqprop.presets import load_preset
    for preset in ("cep-1h", "cvf-1h"):
        data = load_preset(preset)
        data["estimator"]["options"] = {"settle_tol": 1e-3}
        validate_config(data)
        for wrong in ({"settle_tol": -1.0}, {"settle_to": 1e-3}):
            data["estimator"]["options"] = wrong
            with pytest.raises((ConfigError, ValueError), match="settle_to"):
                validate_config(data)
    with pytest.raises(ValueError, match="settle_tol must be positive"):
        ContinualEP(PHASES, settle_tol=float("nan"))
    model, x, target = fc_model("c_vf", "ce")
    with pytest.raises(ValueError, match="readout without parameters"):
        build_estimator("c_vf", Phases(3, 4, 0.2), settle_tol=1e-9).train_step(model, x, target, sgd(model, [0.1] * 4))


def test_a_c_vf_run_with_settle_tol_counts_the_samples_it_left_out(tmp_path):
    from eqprop.config import validate_config
    from eqprop.presets import load_preset
    from eqprop.training import train
    data = load_preset("cvf-1h")
    data["model"]["sizes"] = [784, 16, 10]
    data["data"] = {"dataset": "mnist-demo", "train_subset": 100, "test_subset": 50}
    data["dynamics"].update(t1=4, t2=3)
    data["estimator"]["options"] = {"settle_tol": 1e-3}
    data["train"].update(epochs=1, threads=1, stop_at_chance=None)
    record, = train(validate_config(data), tmp_path, log=lambda _: None)
    assert 0 < record["nudged_excluded"] <= 100
