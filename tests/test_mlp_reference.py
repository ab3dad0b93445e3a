"""The P-MLP reproduces the authors' code (reference case mlp2_mse_hardsig), its phases run
by PyTorch and by eqprop's C kernel."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import KernelOnly, load_vectors, require_c_compiler
from eqprop.dynamics import run_phase
from eqprop.estimators import Phases, build_estimator
from eqprop.models import PMLP
from eqprop.solvers import build_solver

CASE = "mlp2_mse_hardsig"
PHASES = Phases(t1=60, t2=15, beta=0.2)


def reference_model(arrays: dict[str, np.ndarray]) -> PMLP:
    model = PMLP([784, 64, 32, 10], activation="hard_sigmoid", loss="mse").double()
    with torch.no_grad():
        for k, layer in enumerate(model.layers):
            layer.weight.copy_(torch.from_numpy(arrays[f"param/synapses.{k}.weight"]))
            layer.bias.copy_(torch.from_numpy(arrays[f"param/synapses.{k}.bias"]))
    return model


def relative_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    expected_t = torch.from_numpy(expected)
    return float((actual - expected_t).abs().max() / expected_t.abs().max().clamp_min(1e-30))


@pytest.fixture(params=[True, False], ids=["pure_f64", "as_saved"])
def case(request):
    pure = request.param
    return load_vectors(CASE, pure_f64=pure), (1e-12, 1e-9) if pure else (1e-6, 1e-5)


@pytest.fixture(params=["torch", "kernel"])
def runner(request):
    """What runs the phases: PyTorch's steps, or the C kernel on three threads (which fails
    rather than fall back to PyTorch)."""
    if request.param == "torch":
        yield run_phase
        return
    require_c_compiler()
    yield KernelOnly(threads=3)


def test_states_match_reference(case, runner):
    arrays, (state_tol, _) = case
    model = reference_model(arrays)
    x = torch.from_numpy(arrays["x"])
    target = F.one_hot(torch.from_numpy(arrays["y"]), 10).double()
    clamped = model.clamp(x)
    with torch.no_grad():
        free = runner(model, clamped, model.init_state(x), PHASES.t1)
        plus = runner(model, clamped, free, PHASES.t2, PHASES.beta, target)
        minus = runner(model, clamped, free, PHASES.t2, -PHASES.beta, target)
    for name, state in [("free", free), ("plus", plus), ("minus", minus)]:
        for i, s in enumerate(state):
            assert relative_error(s, arrays[f"neurons_{name}/{i}"]) < state_tol, (name, i)
    phi = model.phi(x, free).detach()
    assert relative_error(phi, arrays["phi_free"]) < state_tol


@pytest.mark.parametrize("estimator", ["one_sided", "symmetric", "bptt"])
def test_gradients_match_reference(case, estimator, runner):
    arrays, (_, grad_tol) = case
    model = reference_model(arrays)
    x = torch.from_numpy(arrays["x"])
    target = F.one_hot(torch.from_numpy(arrays["y"]), 10).double()
    chosen = build_estimator(estimator, replace(PHASES, solver=build_solver("fixed", runner)))
    chosen.fill_grads(model, x, target)
    names = [f"synapses.{k}.{kind}" for k in range(3) for kind in ("weight", "bias")]
    for name, p in zip(names, model.trainable_parameters()):
        assert relative_error(p.grad, arrays[f"grad_{estimator}/{name}"]) < grad_tol, name
