"""EP estimates converge to the BPTT gradient as β → 0; symmetric EP is closer (SPEC §3, §5).

Float64, a small network whose free phase has converged, so that the
comparison measures the estimators' bias and not rounding or transients.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eqprop.estimators import Phases, build_estimator
from eqprop.models import PMLP


def flat_direction(estimator, model, x, target) -> torch.Tensor:
    return torch.cat([d.flatten() for d in estimator.estimate(model, x, target).direction])


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(params=["mse", "ce"])
def setup(request):
    g = torch.Generator().manual_seed(3)
    model = PMLP([12, 10, 8, 4], activation="scaled_sigmoid", loss=request.param, generator=g).double()
    x = torch.rand(6, 12, generator=g, dtype=torch.float64)
    target = F.one_hot(torch.randint(0, 4, (6,), generator=g), 4).double()
    return model, x, target


def test_free_phase_converged(setup):
    model, x, _ = setup
    clamped = model.clamp(x)
    with torch.no_grad():
        s = model.init_state(x)
        for _ in range(150):
            s = model.step(clamped, s)
        s_next = model.step(clamped, s)
    assert max(float((a - b).abs().max()) for a, b in zip(s, s_next)) < 1e-12


def test_ep_converges_to_bptt_and_symmetric_is_closer(setup):
    model, x, target = setup
    t1 = t2 = 150
    bptt = flat_direction(build_estimator("bptt", Phases(t1, t2, 0.1), bptt_steps="all"), model, x, target)
    errors = {}
    for beta in (0.2, 0.02, 0.002):
        phases = Phases(t1, t2, beta)
        errors[beta] = {name: relative_distance(flat_direction(build_estimator(name, phases), model, x, target), bptt)
                        for name in ("one_sided", "symmetric")}
        assert errors[beta]["symmetric"] < errors[beta]["one_sided"], errors
    for beta in (0.02, 0.002):
        assert errors[beta]["symmetric"] < 0.1 * errors[beta]["one_sided"], errors
    # bias O(β) for one-sided, O(β²) for symmetric: a 10x smaller β shrinks them ~10x and ~100x
    one_sided_ratio = errors[0.02]["one_sided"] / errors[0.002]["one_sided"]
    symmetric_ratio = errors[0.02]["symmetric"] / errors[0.002]["symmetric"]
    assert 5 < one_sided_ratio < 20, errors
    assert symmetric_ratio > 50, errors
    assert errors[0.002]["symmetric"] < 1e-4


def test_random_sign_draws_both_signs_from_its_generator(setup):
    model, x, target = setup
    phases = Phases(60, 60, 0.05)
    estimator = build_estimator("random_sign", phases, torch.Generator().manual_seed(0))
    signs = {estimator.beta() > 0 for _ in range(40)}
    assert signs == {True, False}
    plus = flat_direction(build_estimator("one_sided", phases), model, x, target)
    minus = flat_direction(build_estimator("one_sided", Phases(60, 60, -0.05)), model, x, target)
    drawn = flat_direction(estimator, model, x, target)
    assert torch.equal(drawn, plus) or torch.equal(drawn, minus)


def test_compiled_phases_give_the_eager_estimate():
    """``train.compile``: the torch.compile'd estimate is the same function as the eager one."""
    g = torch.Generator().manual_seed(3)
    model = PMLP([12, 10, 4], activation="scaled_sigmoid", generator=g)
    x = torch.rand(6, 12, generator=g)
    target = F.one_hot(torch.randint(0, 4, (6,), generator=g), 4).float()
    eager = build_estimator("symmetric", Phases(6, 3, 0.2))
    compiled = build_estimator("symmetric", Phases(6, 3, 0.2))
    compiled.compile()
    for a, b in zip(compiled.estimate(model, x, target).direction, eager.estimate(model, x, target).direction):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
