"""P-CNN: the authors' reference vectors, closed forms against autograd of Φ, EP against BPTT, dropout."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import load_vectors
from eqprop.dynamics import run_phase
from eqprop.estimators import Phases, build_estimator
from eqprop.models.base import EnergyModel
from eqprop.models.cnn import PCNN

CASE = "cnn_ce_softmax_tiefree"
PHASES = Phases(t1=40, t2=8, beta=0.5)


# -- the authors' code (reference case cnn_ce_softmax_tiefree) ------------------------
def reference_model(arrays: dict[str, np.ndarray]) -> PCNN:
    model = PCNN((3, 32, 32), [16, 32], [3, 3], [1, 1], [1, 1], [10],
                 activation="half_hard_sigmoid", loss="ce").double()
    targets = {"synapses.0": model.convs[0], "synapses.1": model.convs[1], "synapses.2": model.head.linear}
    with torch.no_grad():
        for name, module in targets.items():
            module.weight.copy_(torch.from_numpy(arrays[f"param/{name}.weight"]))
            module.bias.copy_(torch.from_numpy(arrays[f"param/{name}.bias"]))
    return model


def relative_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    expected_t = torch.from_numpy(expected)
    return float((actual - expected_t).abs().max() / expected_t.abs().max().clamp_min(1e-30))


@pytest.fixture(params=[True, False], ids=["pure_f64", "as_saved"], scope="module")
def case(request):
    pure = request.param
    # (states, gradients): README promises ~1e-12 / 1e-9 against the pure-float64 run,
    # ~1e-6 against the saved run (their float32 casts of the loss)
    return load_vectors(CASE, pure_f64=pure), (1e-12, 1e-9) if pure else (1e-6, 1e-6)


def reference_batch(arrays):
    x = torch.from_numpy(arrays["x"])
    return x, F.one_hot(torch.from_numpy(arrays["y"]), 10).double()


def test_reference_states(case):
    arrays, (state_tol, _) = case
    model = reference_model(arrays)
    x, target = reference_batch(arrays)
    with torch.no_grad():
        clamped = model.clamp(x)
        free = run_phase(model, clamped, model.init_state(x), PHASES.t1)
        plus = run_phase(model, clamped, free, PHASES.t2, PHASES.beta, target)
        minus = run_phase(model, clamped, free, PHASES.t2, -PHASES.beta, target)
        phi = model.phi(x, free)
    for name, state in [("free", free), ("plus", plus), ("minus", minus)]:
        assert len(state) == 2
        for i, s in enumerate(state):
            assert relative_error(s, arrays[f"neurons_{name}/{i}"]) < state_tol, (name, i)
    assert relative_error(phi, arrays["phi_free"]) < state_tol
    estimate = build_estimator("symmetric", PHASES).estimate(model, x, target)
    for i, s in enumerate(estimate.free_state):
        assert relative_error(s, arrays[f"neurons_free/{i}"]) < state_tol


@pytest.mark.parametrize("estimator", ["one_sided", "symmetric", "bptt"])
def test_reference_gradients(case, estimator):
    arrays, (_, grad_tol) = case
    model = reference_model(arrays)
    x, target = reference_batch(arrays)
    build_estimator(estimator, PHASES).fill_grads(model, x, target)
    names = [f"synapses.{k}.{kind}" for k in range(3) for kind in ("weight", "bias")]
    params = model.trainable_parameters()
    assert len(params) == len(names)
    for name, p in zip(names, params):
        assert relative_error(p.grad, arrays[f"grad_{estimator}/{name}"]) < grad_tol, name


# -- closed forms against autograd of Φ ----------------------------------------------
CONFIGS = {
    # name: (input_shape, channels, kernels, strides, paddings, fc)
    "reference_like": ((3, 8, 8), [4, 5], [3, 3], [1, 1], [1, 1], [3]),
    "odd_floor": ((2, 11, 9), [3, 4], [3, 2], [1, 1], [1, 0], [6, 4]),
    "stride2_outpad": ((1, 10, 13), [3, 2], [3, 3], [2, 1], [1, 1], [5]),
    "one_conv_hidden_fc": ((2, 7, 7), [3], [2], [1], [0], [5, 4, 3]),
    "paper_like_pad0": ((3, 16, 16), [4, 6, 5], [3, 3, 3], [1, 1, 1], [1, 1, 0], [4]),
}


def make(config: str, loss: str, seed: int = 0, **kwargs) -> PCNN:
    shape, channels, kernels, strides, paddings, fc = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    return PCNN(shape, channels, kernels, strides, paddings, fc, loss=loss, generator=g, **kwargs).double()


def random_batch(model: PCNN, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.input_shape, generator=g, dtype=torch.float64)
    state = [torch.rand(s.shape, generator=g, dtype=torch.float64) for s in model.init_state(x)]
    classes = model.fc[-1]
    target = F.one_hot(torch.randint(0, classes, (batch,), generator=g), classes).double()
    return x, state, target


def assert_close_lists(actual, expected, tol=1e-12):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, (i, a.shape, e.shape)
        a, e = a.detach(), e.detach()
        scale = float(e.abs().max().clamp_min(1.0))
        assert float((a - e).abs().max()) <= tol * scale, (i, float((a - e).abs().max()))


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_closed_forms_equal_autograd_of_phi(config, loss):
    model = make(config, loss)
    x, state, _ = random_batch(model)
    clamped = model.clamp(x)
    with torch.no_grad():
        closed = model.preactivations(clamped, state)
        grads = model.param_grads(clamped, state)
    assert_close_lists(closed, EnergyModel.preactivations(model, clamped, state))
    assert_close_lists(grads, EnergyModel.param_grads(model, clamped, state))
    assert len(grads) == len(model.phi_parameters())


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_channels_last_gives_the_same_results(loss):
    model = make("paper_like_pad0", loss)
    x, state, target = random_batch(model)
    fast = make("paper_like_pad0", loss).to(memory_format=torch.channels_last)
    assert model.memory_format() == torch.contiguous_format
    assert fast.memory_format() == torch.channels_last
    assert all(s.is_contiguous(memory_format=torch.channels_last) for s in fast.init_state(x)[:3])
    fast_state = [s.contiguous(memory_format=torch.channels_last) if s.dim() == 4 else s for s in state]
    with torch.no_grad():
        for a, b in [(model.clamp(x), fast.clamp(x))]:
            assert_close_lists(fast.preactivations(b, fast_state), model.preactivations(a, state))
            assert_close_lists(fast.param_grads(b, fast_state), model.param_grads(a, state))
    phases = Phases(15, 4, 0.1)
    est = build_estimator("symmetric", phases)
    assert_close_lists(est.estimate(fast, x, target).direction, est.estimate(model, x, target).direction)
    # gradients keep the parameters' layout: a fused optimizer on CUDA refuses mixed strides
    est.fill_grads(fast, x, target)
    assert all(p.grad.stride() == p.stride() for p in fast.parameters())
    assert any(p.dim() == 4 and not p.is_contiguous() for p in fast.parameters())


def test_state_shapes_and_structure():
    model = PCNN((3, 32, 32), [128, 256, 512, 512], [3] * 4, [1] * 4, [1, 1, 1, 0], [10])
    x = torch.zeros(2, 3, 32, 32)
    assert [tuple(s.shape) for s in model.init_state(x)] == [
        (2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4), (2, 512, 1, 1)]
    assert model.head.linear.in_features == 512 and len(model.fcs) == 0
    groups = model.layer_parameters()
    assert len(groups) == 5 and groups[-1] == list(model.head.parameters())
    assert [p for g in groups for p in g] == model.trainable_parameters()
    mse = PCNN((3, 32, 32), [8, 8, 8, 8], [3] * 4, [1] * 4, [1, 1, 1, 0], [10], loss="mse")
    assert [tuple(s.shape) for s in mse.init_state(x)][-1] == (2, 10) and len(mse.layer_parameters()) == 5
    hidden = PCNN((3, 32, 32), [8, 8], [3] * 2, [1] * 2, [1, 1], [20, 10], loss="ce")
    assert [tuple(s.shape) for s in hidden.init_state(x)][-1] == (2, 20)
    assert hidden.head.linear.in_features == 20


def test_init_is_seeded():
    a, b = make("odd_floor", "ce", seed=5), make("odd_floor", "ce", seed=5)
    c = make("odd_floor", "ce", seed=6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.convs[0].weight, c.convs[0].weight)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kernels=[3]), "kernels"),
    (dict(strides=[1, 1, 1]), "strides"),
    (dict(paddings=[-1, 0]), "paddings"),
    (dict(channels=[]), "channels"),
    (dict(fc=[]), "fc"),
    (dict(input_shape=(3, 8)), "input_shape"),
    (dict(input_shape=(3, 3, 3)), "too small"),
    (dict(kernels=[11, 3]), "exceeds"),
    (dict(loss="nll"), "loss"),
    (dict(dropout=1.0), "dropout"),
    (dict(activation="relu"), "activation"),
])
def test_invalid_arguments(kwargs, message):
    args = dict(input_shape=(3, 8, 8), channels=[4, 5], kernels=[3, 3], strides=[1, 1], paddings=[1, 1],
                fc=[3])
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        PCNN(**args)


# -- EP against BPTT on a small ConvNet ----------------------------------------------------
def flat(estimate) -> torch.Tensor:
    return torch.cat([d.flatten() for d in estimate.direction])


def small_convnet(loss: str, fc: list[int], dropout: float = 0.0):
    g = torch.Generator().manual_seed(0)
    model = PCNN((1, 12, 12), [4, 8], [3, 3], [1, 1], [1, 1], fc, activation="scaled_sigmoid",
                 loss=loss, dropout=dropout, generator=g).double()
    x = torch.rand(5, 1, 12, 12, generator=g, dtype=torch.float64)
    target = F.one_hot(torch.randint(0, 10, (5,), generator=g), 10).double()
    return model, x, target


T_LONG = 120


@pytest.mark.parametrize("loss, fc", [("ce", [10]), ("mse", [10]), ("ce", [12, 10])])
def test_symmetric_ep_approaches_bptt(loss, fc):
    model, x, target = small_convnet(loss, fc)
    clamped = model.clamp(x)
    with torch.no_grad():   # the free phase has converged: the comparison measures the estimators
        s = run_phase(model, clamped, model.init_state(x), T_LONG)
        s_next = model.step(clamped, s)
    assert max(float((a - b).abs().max()) for a, b in zip(s, s_next)) < 1e-12
    bptt = flat(build_estimator("bptt", Phases(T_LONG, T_LONG, 0.1), bptt_steps="all").estimate(model, x, target))
    errors, cosines = {}, {}
    for beta in (0.01, 0.001):
        for name in ("one_sided", "symmetric"):
            est = flat(build_estimator(name, Phases(T_LONG, T_LONG, beta)).estimate(model, x, target))
            errors[name, beta] = float((est - bptt).norm() / bptt.norm())
            cosines[name, beta] = float(F.cosine_similarity(est, bptt, dim=0))
    for beta in (0.01, 0.001):
        assert errors["symmetric", beta] < 0.1 * errors["one_sided", beta], errors
        assert cosines["symmetric", beta] > 0.99999, cosines
    # one-sided bias O(β), symmetric O(β²)
    assert 5 < errors["one_sided", 0.01] / errors["one_sided", 0.001] < 20, errors
    assert errors["symmetric", 0.01] / errors["symmetric", 0.001] > 50, errors
    assert errors["symmetric", 0.001] < 1e-5, errors


# -- dropout ---------------------------------------------------------------------------
class Recorder:
    """Wraps ``model.step`` to record the dropout mask seen at every step."""

    def __init__(self, model: PCNN) -> None:
        self.masks: list[torch.Tensor | None] = []
        self.head_masks: list[torch.Tensor | None] = []
        step = model.step

        def recording_step(clamped, state, beta=0.0, target=None):
            self.masks.append(clamped.mask)
            self.head_masks.append(getattr(model.head, "mask", None))
            return step(clamped, state, beta, target)

        model.step = recording_step


@pytest.mark.parametrize("fc", [[10], [12, 10]])
def test_dropout_mask_fixed_per_batch_and_redrawn(fc):
    model, x, target = small_convnet("ce", fc, dropout=0.3)
    model.dropout_generator = torch.Generator().manual_seed(11)
    recorder = Recorder(model)
    phases = Phases(10, 4, 0.1)
    estimator = build_estimator("symmetric", phases)
    estimator.estimate(model, x, target)
    first = recorder.masks[0]
    # the free phase, then both nudged phases side by side in a doubled batch
    assert len(recorder.masks) == phases.t1 + phases.t2
    assert first is not None and first.shape == (5, model.features)
    assert all(m is first for m in recorder.masks[:phases.t1])
    assert all(torch.equal(m, first.repeat(2, 1)) for m in recorder.masks[phases.t1:])
    if not model.fcs:   # the readout reads the masked last conv state: same mask in the head
        assert all(m is first for m in recorder.head_masks)
    keep = 1.0 / 0.7
    assert set(first.unique().tolist()) <= {0.0, keep}
    estimator.estimate(model, x, target)
    second = recorder.masks[-1]
    assert not torch.equal(first, second)
    # the generator decides the mask
    model.dropout_generator = torch.Generator().manual_seed(11)
    assert torch.equal(model.clamp(x).mask, first)
    # about 30% dropped over many draws
    big = torch.cat([model.clamp(x).mask for _ in range(200)])
    assert abs(float((big == 0).double().mean()) - 0.3) < 0.02


def test_dropout_absent_in_eval_mode():
    model, x, target = small_convnet("ce", [10], dropout=0.5)
    reference, _, _ = small_convnet("ce", [10], dropout=0.0)
    model.eval()
    clamped = model.clamp(x)
    assert clamped.mask is None and model.dropout_mask is None and model.head.mask is None
    phases = Phases(20, 5, 0.1)
    a = flat(build_estimator("symmetric", phases).estimate(model, x, target))
    b = flat(build_estimator("symmetric", phases).estimate(reference, x, target))
    assert torch.equal(a, b)
    # a mask drawn in training mode is ignored once the model is in eval mode
    model.train()
    assert model.clamp(x).mask is not None
    state = model.init_state(x)
    state = [torch.rand_like(s) for s in state]
    masked_logits = model.logits(state)
    model.eval()
    assert torch.equal(model.logits(state), reference.logits(state))
    assert not torch.allclose(masked_logits, reference.logits(state))


@pytest.mark.parametrize("loss, fc", [("ce", [10]), ("ce", [12, 10]), ("mse", [10])])
def test_dropout_closed_forms_equal_autograd(loss, fc):
    model, x, target = small_convnet(loss, fc, dropout=0.4)
    model.dropout_generator = torch.Generator().manual_seed(2)
    g = torch.Generator().manual_seed(3)
    state = [torch.rand(s.shape, generator=g, dtype=torch.float64) for s in model.init_state(x)]
    clamped = model.clamp(x)
    assert clamped.mask is not None and bool((clamped.mask == 0).any())
    with torch.no_grad():
        closed = model.preactivations(clamped, state)
        grads = model.param_grads(clamped, state)
    assert_close_lists(closed, EnergyModel.preactivations(model, clamped, state))
    assert_close_lists(grads, EnergyModel.param_grads(model, clamped, state))
    # the mask really enters Φ (fc above the convs) or the readout (fc == [classes], "ce")
    masked = (model.phi(x, state), model.head.loss(state[-1], target))
    model.dropout_mask = None
    if hasattr(model.head, "mask"):
        model.head.mask = None
    unmasked = (model.phi(x, state), model.head.loss(state[-1], target))
    which = 0 if model.fcs else 1
    assert not torch.allclose(masked[which], unmasked[which])
    model.dropout_mask = clamped.mask
    if hasattr(model.head, "mask"):
        model.head.mask = clamped.mask
    # Φ_β = Φ - βℓ stays one function: its state gradient is the nudged pre-activation,
    # its parameter gradient what the estimators use
    beta = 0.3
    leaves = [s.clone().requires_grad_() for s in state]
    params = model.trainable_parameters()
    phi_beta = model.phi(x, leaves) - beta * model.head.loss(leaves[-1], target)
    by_state = torch.autograd.grad(phi_beta.sum(), leaves, retain_graph=True)
    by_param = torch.autograd.grad(phi_beta.mean(), params, allow_unused=True)
    with torch.no_grad():
        nudged = model.preactivations(clamped, state)
        nudged[-1] = nudged[-1] + model.head.nudge(state[-1], target, beta)
        param_grads = model.nudged_param_grads(clamped, state, beta, target)
    assert_close_lists(nudged, list(by_state))
    assert_close_lists(param_grads, [torch.zeros_like(p) if g is None else g for p, g in zip(params, by_param)])
    # dropped features get no readout / first-fc gradient
    dropped = (clamped.mask == 0).all(dim=0)
    weight = model.fcs[0].weight if model.fcs else model.head.linear.weight
    index = [p is weight for p in params].index(True)
    assert bool(dropped.any()) and float(param_grads[index][:, dropped].abs().max()) == 0.0


def test_dropout_ep_approaches_bptt_of_the_masked_network():
    """With one mask held fixed, symmetric EP estimates the gradient of the masked network's loss."""
    model, x, target = small_convnet("ce", [10], dropout=0.25)

    def reseed():
        model.dropout_generator = torch.Generator().manual_seed(4)

    reseed()
    params = model.trainable_parameters()
    with torch.enable_grad():   # BPTT through all steps, one clamp (one mask)
        clamped = model.clamp(x)
        state = run_phase(model, clamped, model.init_state(x), T_LONG)
        loss = model.head.loss(state[-1], target).mean()
        bptt = torch.cat([-g.flatten() for g in torch.autograd.grad(loss, params)])
    errors = {}
    for name in ("one_sided", "symmetric"):
        reseed()
        est = build_estimator(name, Phases(T_LONG, T_LONG, 0.001)).estimate(model, x, target)
        errors[name] = float((flat(est) - bptt).norm() / bptt.norm())
    assert errors["symmetric"] < 1e-5 and errors["symmetric"] < 0.1 * errors["one_sided"], errors


def test_the_readouts_nudge_reads_the_mask_of_its_clamped_input():
    """A step uses the dropout mask of the clamped input it is given, not the model's latest one
    (what lets a CUDA graph replay each batch with its own mask)."""
    model, x, target = small_convnet("ce", [10], dropout=0.3)
    model.dropout_generator = torch.Generator().manual_seed(3)
    clamped = model.clamp(x)
    state = [torch.rand_like(s) for s in model.init_state(x)]
    expected = model.step(clamped, state, 0.2, target)
    later = model.clamp(x)               # another batch's mask is now the model's
    assert not torch.equal(later.mask, clamped.mask)
    got = model.step(clamped, state, 0.2, target)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert model.head.mask is later.mask  # and the model's own is left as it was
