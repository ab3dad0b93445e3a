"""The GDU theorem check (SPEC §5): EP's per-step updates against BPTT's per-step gradients.

Float64, small networks. The bound used throughout is ``BOUND = 5β`` on every
layer's mean RMSE. Why: for one-sided EP the per-step traces are
``Δ(t) = -∇(t) + β·c(t) + O(β²)`` (the theorem's first-order bias), and C-EP
adds an ``O(η/β)`` drift from the moving weights. On the converged network
below the one-sided RMSE is about 1.6β (and scales linearly with β, checked
here: 10x smaller β gives ~10x smaller RMSE), C-EP with η = 1e-5 (η/β = 1e-3)
about 2.6β, so 5β leaves about 2x margin; an unconverged free phase gives an
RMSE of order 1, 20x above it. The constant c depends on the network (the
P-CNN and the vector-field stand-in below say how much where they differ).
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from eqprop.dynamics import run_phase
from eqprop.estimators import Phases, build_estimator
from eqprop.estimators.continual import ContinualEP
from eqprop.gdu import bptt_step_grads, ep_step_updates, gradient_angle, run_gdu, unit_rmse
from eqprop.models import PMLP
from eqprop.models.cnn import PCNN

torch.set_num_threads(1)
BETA = 0.01
BOUND = 5 * BETA
K = 10
LR = 1e-5


def tanh_mlp(loss: str = "mse", batch: int = 2):
    g = torch.Generator().manual_seed(3)
    model = PMLP([12, 10, 8, 4], activation="tanh", loss=loss, generator=g).double()
    x = torch.rand(batch, 12, generator=g, dtype=torch.float64)
    target = F.one_hot(torch.randint(0, 4, (batch,), generator=g), 4).double()
    return model, x, target


def tiny_cnn():
    g = torch.Generator().manual_seed(0)
    model = PCNN((1, 12, 12), [4, 8], [3, 3], [1, 1], [1, 1], [10], activation="scaled_sigmoid",
                 loss="ce", generator=g).double()
    x = torch.rand(2, 1, 12, 12, generator=g, dtype=torch.float64)
    target = F.one_hot(torch.randint(0, 10, (2,), generator=g), 10).double()
    return model, x, target


def worst(report, estimator):
    return max(layer["rmse_mean"] for layer in report["estimators"][estimator]["layers"].values())


def quiet_gdu(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_gdu(*args, **kwargs)


# -- BPTT per step --------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: tanh_mlp("mse"), lambda: tanh_mlp("ce"), tiny_cnn],
                         ids=["mlp-mse", "mlp-ce", "cnn-ce"])
def test_bptt_steps_sum_to_truncated_bptt(make):
    model, x, target = make()
    t1 = 30
    with torch.no_grad():
        start = run_phase(model, model.clamp(x), model.init_state(x), t1 - K)
    steps = bptt_step_grads(model, x, target, start, K)
    assert all(p.shape[0] == K for p in steps.params + steps.neurons)
    for t in (1, 4, K):   # cumulative sum up to t = BPTT truncated to the last t steps
        full = build_estimator("bptt", Phases(t1, K, 0.1), bptt_steps=t).estimate(model, x, target).direction
        for per_step, d in zip(steps.params, full):
            torch.testing.assert_close(per_step[:t].sum(0), -d, rtol=1e-10, atol=1e-14)


# -- EP per step ----------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: tanh_mlp("ce"), tiny_cnn], ids=["mlp-ce", "cnn-ce"])
def test_ep_traces_sum_to_their_estimators(make):
    model, x, target = make()
    model.eval()
    phases = Phases(40, 6, 0.05)
    with torch.no_grad():
        free = run_phase(model, model.clamp(x), model.init_state(x), phases.t1)
    expected = {"one_sided": build_estimator("one_sided", phases).estimate(model, x, target).direction,
                "symmetric": build_estimator("symmetric", phases).estimate(model, x, target).direction,
                "c_ep": ContinualEP(phases, lr=0.01).estimate(model, x, target).direction}
    for name, direction in expected.items():
        trace = ep_step_updates(model, x, free, target, phases.beta, phases.t2, name, lr=0.01)
        for per_step, d in zip(trace.params, direction):
            torch.testing.assert_close(per_step.sum(0), d, rtol=1e-9, atol=1e-12)


# -- the theorem ----------------------------------------------------------------------------
def test_c_ep_per_step_updates_match_bptt_on_a_converged_network():
    model, x, target = tanh_mlp()
    report = run_gdu(model, x, target, t1=150, k=K, beta=BETA, lr=LR)
    assert report["settings"]["converged"] and report["settings"]["free_residual"] < 1e-9
    for name in ("one_sided", "c_ep", "symmetric"):
        for layer, m in report["estimators"][name]["layers"].items():
            assert m["rmse_mean"] < BOUND, (name, layer, m)
            assert m["sign_agreement"] > 95, (name, layer, m)
        assert report["estimators"][name]["angle_deg"] < 2.0
    # symmetric is closer than one-sided on every layer (bias O(β²) vs O(β))
    for layer, m in report["estimators"]["symmetric"]["layers"].items():
        assert m["rmse_mean"] < 0.1 * report["estimators"]["one_sided"]["layers"][layer]["rmse_mean"], layer
    assert report["estimators"]["symmetric"]["angle_deg"] < report["estimators"]["one_sided"]["angle_deg"]
    # the bias is the theorem's: O(β) one-sided, O(β²) symmetric
    smaller = run_gdu(model, x, target, t1=150, k=K, beta=BETA / 10, estimators=("one_sided", "symmetric"))
    assert 7 < worst(report, "one_sided") / worst(smaller, "one_sided") < 13
    assert worst(report, "symmetric") / worst(smaller, "symmetric") > 70


def test_c_ep_follows_bptt_only_at_small_learning_rates_and_says_so():
    """C-EP's theorem: its per-step updates follow BPTT's gradients as η → 0 (the paper's figure)."""
    model, x, target = tanh_mlp()
    errors = {}
    for lr in (LR, 2e-5, 1e-4, 1e-3):
        report = run_gdu(model, x, target, t1=150, k=K, beta=BETA, lr=lr, estimators=("c_ep",))
        errors[lr] = worst(report, "c_ep")
        notes = [n for n in report["settings"]["regime_notes"] if n.startswith("c_ep: at --lr")]
        assert bool(notes) == (lr >= 1e-4), (lr, notes)
    assert errors[LR] < BOUND and errors[2e-5] < BOUND
    assert errors[LR] < errors[2e-5] < errors[1e-4] < errors[1e-3]
    assert errors[1e-3] > 10 * BOUND


def test_the_same_bound_fails_when_the_free_phase_has_not_converged():
    model, x, target = tanh_mlp()
    report = run_gdu(model, x, target, t1=K, k=K, beta=BETA, lr=LR)
    assert not report["settings"]["converged"]
    assert any(note.startswith("the free phase has not converged") for note in report["settings"]["regime_notes"])
    for name in ("one_sided", "c_ep"):
        assert worst(report, name) > 10 * BOUND, name
        assert report["estimators"][name]["angle_deg"] > 30


def test_neurons_match_only_in_pre_activation_space():
    """Fact 1 of SPEC §5: Δ_s(t) ≈ -σ'(u*)·∂L/∂s, not -∂L/∂s."""
    model, x, target = tanh_mlp()
    with torch.no_grad():
        start = run_phase(model, model.clamp(x), model.init_state(x), 150 - K)
    bptt = bptt_step_grads(model, x, target, start, K)
    ep = ep_step_updates(model, x, bptt.final_state, target, BETA, K, "one_sided")
    for grads, slope, delta in zip(bptt.neurons, bptt.sigma_prime, ep.neurons):
        weighted = float(unit_rmse(-slope * grads, delta).mean())
        raw = float(unit_rmse(-grads, delta).mean())
        assert weighted < BOUND < raw, (weighted, raw)


def test_structural_zeros_of_synchronous_updates_are_left_out():
    """Fact 2 of SPEC §5: layer n's BPTT trace is zero until the error arrives, then every other step."""
    model, x, target = tanh_mlp()
    report = run_gdu(model, x, target, t1=150, k=K, beta=BETA, estimators=("one_sided",))
    layers = report["estimators"]["one_sided"]["layers"]
    assert layers["s3"]["steps_used"] == [1, 3, 5, 7, 9]       # output layer: t = 1, 3, ...
    assert layers["s2"]["steps_used"] == [2, 4, 6, 8, 10]
    assert layers["s1"]["steps_used"] == [3, 5, 7, 9]
    assert layers["layers.0.bias"]["steps_used"] == [3, 5, 7, 9]   # b_1 and W_1 only act on s1
    assert layers["layers.1.weight"]["steps_used"] == list(range(2, K + 1))   # W_2 acts on s1 and s2
    # what EP does on the excluded steps is second order: small next to its signal
    for name in ("s1", "s2", "s3", "layers.0.weight"):
        assert layers[name]["excluded_ep_fraction"] < 10 * BETA, (name, layers[name])


def test_p_cnn_and_softmax_readout():
    model, x, target = tiny_cnn()
    # conv weights are shared over positions: their updates are larger, so C-EP's O(η/β) drift
    # is too (about 3β at η = 1e-5, 1.7β at 2e-6, 1.5β at η = 0 on the worst layer, a conv bias)
    report = run_gdu(model, x, target, t1=120, k=8, beta=BETA, lr=LR / 5)
    assert report["settings"]["converged"]
    for name in ("one_sided", "c_ep"):
        assert worst(report, name) < BOUND, name
    assert worst(report, "symmetric") < 0.1 * worst(report, "one_sided")
    assert "head.linear.weight" in report["estimators"]["c_ep"]["layers"]


def stand_in_vf():
    from test_continual import StandInVF
    g = torch.Generator().manual_seed(4)
    model = StandInVF([6, 7, 5, 3], g).double()
    with torch.no_grad():   # contracting weights
        for layer in model.forward_layers:
            layer.weight.mul_(0.3)
    x = torch.rand(2, 6, generator=g, dtype=torch.float64)
    target = F.one_hot(torch.randint(0, 3, (2,), generator=g), 3).double()

    def tie():
        for n, b in enumerate(model.backward_weights):
            b.copy_(model.forward_layers[n + 1].weight.t())
    return model, x, target, tie, 150


def vf_mlp():
    from eqprop.models.vf import VFMLP
    g = torch.Generator().manual_seed(3)
    model = VFMLP([12, 10, 8, 4], activation="tanh", loss="mse", generator=g).double()
    x = torch.rand(2, 12, generator=g, dtype=torch.float64)
    target = F.one_hot(torch.randint(0, 4, (2,), generator=g), 4).double()
    return model, x, target, model.tie_backward_, 150


def vf_cnn():
    from eqprop.models.vf_cnn import VFCNN
    g = torch.Generator().manual_seed(0)
    model = VFCNN((1, 12, 12), [4, 8], [3, 3], [1, 1], [1, 1], [10], activation="scaled_sigmoid", loss="ce",
                  generator=g).double()
    x = torch.rand(2, 1, 12, 12, generator=g, dtype=torch.float64)
    target = F.one_hot(torch.randint(0, 10, (2,), generator=g), 10).double()
    return model, x, target, model.tie_backward_, 120


@pytest.mark.parametrize("make", [stand_in_vf, vf_mlp, vf_cnn], ids=["stand-in", "VFMLP", "VFCNN"])
def test_vector_field_models(make):
    model, x, target, tie, t1 = make()
    # B independent of W^T: no Φ, and VF's updates do not follow BPTT
    untied = run_gdu(model, x, target, t1=t1, k=8, beta=BETA, lr=LR / 5)
    assert set(untied["estimators"]) == {"vf", "c_vf"} and untied["settings"]["converged"]
    assert worst(untied, "vf") > 10 * BOUND
    with pytest.raises(ValueError, match="vector-field"):
        run_gdu(model, x, target, t1=t1, k=8, beta=BETA, estimators=("one_sided",))
    with torch.no_grad():   # B = W^T: the VF model is the P-model, and the theorem applies again
        tie()
    tied = run_gdu(model, x, target, t1=t1, k=8, beta=BETA, lr=LR / 5)
    for name in ("vf", "c_vf"):   # the stand-in's first-order constant is larger: RMSE ≈ 4.5β
        assert worst(tied, name) < 2 * BOUND, name
    assert tied["estimators"]["vf"]["angle_deg"] < 1.0 < untied["estimators"]["vf"]["angle_deg"]


def test_run_gdu_leaves_the_model_unchanged():
    model, x, target = tiny_cnn()
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    run_gdu(model, x, target, t1=30, k=5, beta=BETA, lr=0.1)
    assert model.training
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# -- outputs ----------------------------------------------------------------------------------
def test_run_gdu_writes_json_and_figures(tmp_path):
    model, x, target = tanh_mlp("ce")
    report = run_gdu(model, x, target, t1=300, k=K, beta=BETA, lr=LR, out_dir=tmp_path)
    data = json.loads((tmp_path / "gdu.json").read_text())
    assert data == json.loads(json.dumps(report))
    settings = data["settings"]
    for key in ("t1", "k", "beta", "lr", "seed", "estimators", "batch_size", "free_residual", "converged",
                "neuron_space"):
        assert key in settings
    assert list(data["estimators"]) == ["one_sided", "symmetric", "c_ep"]
    for name, result in data["estimators"].items():
        assert isinstance(result["angle_deg"], float)
        assert set(result["layers"]) == {"s1", "s2", "layers.0.weight", "layers.0.bias", "layers.1.weight",
                                         "layers.1.bias", "head.linear.weight", "head.linear.bias"}
        for layer in result["layers"].values():
            assert {"rmse_mean", "rmse_std", "sign_agreement", "angle_deg", "steps_used"} <= set(layer)
    for png in ("gdu_traces.png", "gdu_rmse.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gdu_command_on_the_mnist_demo(tmp_path):
    from eqprop.config import validate_config
    from eqprop.gdu import gdu_command
    config = validate_config({"model": {"sizes": [784, 24, 10]}, "data": {"dataset": "mnist-demo"},
                              "dynamics": {"t1": 40, "t2": 6, "beta": 0.1}, "train": {"device": "cpu"}})
    report = gdu_command(config, tmp_path, batch_size=3, k=5, beta=BETA, t1=60, estimators=None,
                         data_dir=None, seed=1)
    assert report["settings"]["batch_size"] == 3 and report["settings"]["k"] == 5
    assert report["settings"]["dtype"] == "float64"
    assert (tmp_path / "gdu.json").exists() and (tmp_path / "gdu_rmse.png").exists()
    assert worst(report, "symmetric") < worst(report, "one_sided")


# -- gradient angle for training logs ---------------------------------------------------------
def test_gradient_angle():
    model, x, target = tanh_mlp("ce")
    phases = Phases(150, 150, 0.001)
    assert gradient_angle(model, build_estimator("symmetric", phases), x, target, "all") < 0.01
    # the reference is BPTT through all T2 = 150 steps: truncating it to 1 step is far off
    assert gradient_angle(model, build_estimator("bptt", phases, bptt_steps=1), x, target, None) > 10.0
    # C-EP with random signs: the call neither moves the model nor disturbs the sign stream
    estimator = ContinualEP(Phases(150, 20, 0.01), torch.Generator().manual_seed(0), random_sign=True, lr=1e-5)
    state = estimator.generator.get_state()
    before = [p.detach().clone() for p in model.parameters()]
    angle = gradient_angle(model, estimator, x, target, "all")
    assert 0 <= angle < 5
    assert torch.equal(estimator.generator.get_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_nan_or_inf_never_reads_as_agreement():
    from eqprop.gdu.metrics import angle_deg
    import math
    r = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    bad = r.clone()
    bad[1, 0] = float("nan")
    assert unit_rmse(r, r).eq(0).all()
    assert unit_rmse(r, bad)[0].isnan() and unit_rmse(r, bad)[1] == 0
    assert math.isnan(angle_deg(r, bad))
    assert math.isnan(angle_deg(r, r * float("inf")))
    assert angle_deg(r, r) == pytest.approx(0.0, abs=1e-6)


def test_gdu_cli_refuses_a_non_finite_beta(capsys):
    from eqprop.cli import main
    for value in ("nan", "inf", "-0.1"):
        assert main(["gdu", "--preset", "demo", "--beta", value]) == 2
        assert "finite number > 0" in capsys.readouterr().err


def test_gdu_refuses_an_unknown_estimator_before_any_work(capsys):
    model, x, target = tanh_mlp("ce")
    with pytest.raises(ValueError, match="unknown GDU estimator nope"):
        run_gdu(model, x, target, t1=10**9, k=2, beta=0.01, estimators=["nope"])   # would run for ever
    from eqprop.cli import main
    assert main(["gdu", "--preset", "demo", "--estimators", "nope"]) == 2
    assert "unknown GDU estimator" in capsys.readouterr().err


# -- the command shows the theorem by default -------------------------------------------------
def test_gdu_defaults_show_the_theorem_on_a_model_of_no_preset(capsys, tmp_path):
    """Whatever the preset trains with (here β 0.5, nudge after σ, T1 5), the defaults take a
    small β, the nudge inside σ and a converged free phase: symmetric EP is then closer to BPTT
    than one-sided EP on every layer, and no regime note is printed."""
    from eqprop.cli import main
    argv = ["gdu", "--preset", "demo", "--set", "model.sizes=[784,40,30,10]", "--set", "dynamics.beta=0.5",
            "--set", "dynamics.t1=5", "--batch-size", "6", "--k", "8", "--out", str(tmp_path / "gdu")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "β 0.01, nudge inside σ, free phase converged" in out and "note:" not in out
    report = json.loads((tmp_path / "gdu" / "gdu.json").read_text())
    assert report["settings"]["t1"] > 5 + 8 and report["settings"]["converged"]
    symmetric, one_sided = (report["estimators"][name]["layers"] for name in ("symmetric", "one_sided"))
    for layer in symmetric:
        assert symmetric[layer]["rmse_mean"] < one_sided[layer]["rmse_mean"], layer


def test_gdu_says_when_its_settings_leave_the_theorems_regime(capsys, tmp_path):
    from eqprop.cli import main
    argv = ["gdu", "--preset", "demo", "--set", "model.sizes=[784,20,10]", "--set", "model.nudge=outside",
            "--beta", "0.5", "--t1", "6", "--k", "4", "--batch-size", "4", "--out", str(tmp_path / "gdu")]
    assert main(argv) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 3
    assert "not converged" in notes[0] and "β = 0.5 is large" in notes[1] and "nudged after σ" in notes[2]


def test_a_saturated_network_says_there_is_nothing_to_compare(tmp_path):
    """Every state where σ' = 0: BPTT's gradients are zero on every parameter. The check says so
    in a note and writes its report, instead of failing on an empty figure."""
    _, x, target = tanh_mlp()
    model = PMLP([12, 10, 8, 4], activation="hard_sigmoid").double()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.fill_(5.0 if name.endswith("bias") else 0.0)
    report = run_gdu(model, x, target, t1=20, k=K, beta=BETA, lr=LR, out_dir=tmp_path)
    assert any("zero on every parameter" in note for note in report["settings"]["regime_notes"])
    assert (tmp_path / "gdu.json").exists() and not (tmp_path / "gdu_traces.png").exists()
