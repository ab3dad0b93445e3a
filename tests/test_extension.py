"""Extending eqprop: a model defined by its Φ alone, and a registered estimator, just work."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eqprop import ESTIMATORS, EnergyModel, Estimate, Estimator, PMLP, Phases, build_estimator, record_phase, register, run_phase
from eqprop.heads import SquaredError


class PhiOnlyMLP(EnergyModel):
    """A user model: only Φ, the initial state and the layer groups; dynamics come from autograd."""

    def __init__(self, reference: PMLP) -> None:
        super().__init__()
        self.activation = reference.activation
        self.head = SquaredError(reference.sizes[-1])
        self.weights = nn.ParameterList([nn.Parameter(layer.weight.detach().clone()) for layer in reference.layers])
        self.biases = nn.ParameterList([nn.Parameter(layer.bias.detach().clone()) for layer in reference.layers])

    def init_state(self, x):
        return [x.new_zeros(x.shape[0], w.shape[0]) for w in self.weights]

    def phi(self, x, state):
        below = [x] + list(state[:-1])
        return sum(((s @ w) * b).sum(1) + s @ c for s, b, w, c in zip(state, below, self.weights, self.biases))

    def phi_parameters(self):
        return [p for pair in zip(self.weights, self.biases) for p in pair]

    def layer_parameters(self):
        return [[w, b] for w, b in zip(self.weights, self.biases)]


def setup():
    g = torch.Generator().manual_seed(5)
    reference = PMLP([10, 8, 6, 3], activation="scaled_sigmoid", generator=g).double()
    x = torch.rand(4, 10, generator=g, dtype=torch.float64)
    target = F.one_hot(torch.tensor([0, 1, 2, 1]), 3).double()
    return reference, PhiOnlyMLP(reference), x, target


def test_phi_only_model_matches_closed_form_model_for_every_estimator():
    reference, user, x, target = setup()
    phases = Phases(40, 12, 0.1)
    for name in ("one_sided", "symmetric", "bptt"):
        a = build_estimator(name, phases).estimate(reference, x, target).direction
        b = build_estimator(name, phases).estimate(user, x, target).direction
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_registered_estimator_is_usable_by_name(monkeypatch):
    monkeypatch.setattr("eqprop.estimators.base.ESTIMATORS", dict(ESTIMATORS))

    @register("test_half_symmetric")
    class HalfSymmetric(Estimator):
        def estimate(self, model, x, target):
            result = build_estimator("symmetric", self.phases).estimate(model, x, target)
            return Estimate([0.5 * d for d in result.direction], result.free_state)

    reference, _, x, target = setup()
    phases = Phases(30, 10, 0.1)
    half = build_estimator("test_half_symmetric", phases).estimate(reference, x, target).direction
    full = build_estimator("symmetric", phases).estimate(reference, x, target).direction
    for h, f in zip(half, full):
        torch.testing.assert_close(2 * h, f)


def test_record_phase_returns_the_trajectory():
    reference, _, x, target = setup()
    clamped = reference.clamp(x)
    with torch.no_grad():
        trajectory = record_phase(reference, clamped, reference.init_state(x), 7, 0.2, target)
        final = run_phase(reference, clamped, reference.init_state(x), 7, 0.2, target)
    assert [t.shape for t in trajectory] == [(8, 4, 8), (8, 4, 6), (8, 4, 3)]
    for layer, last in zip(trajectory, final):
        assert torch.equal(layer[-1], last)
        assert torch.equal(layer[0], torch.zeros_like(last))


def test_only_closed_form_models_are_replayed_as_cuda_graphs():
    """A Φ-only model steps through autograd, which a CUDA graph must not capture."""
    from eqprop.models.cnn import PCNN
    reference, user, _, _ = setup()
    assert reference.supports_cuda_graphs()
    assert not user.supports_cuda_graphs()
    conv = PCNN((3, 8, 8), [4], [3], [1], [1], [3], dropout=0.5)
    conv.clamp(torch.rand(2, 3, 8, 8))               # training mode: draws the batch's mask
    assert conv.supports_cuda_graphs()               # which travels with the clamped input
    conv.eval()
    assert conv.supports_cuda_graphs()
    assert PCNN((3, 8, 8), [4], [3], [1], [1], [3]).supports_cuda_graphs()
