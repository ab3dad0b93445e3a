"""Models written as Φ (PhiModel) or as a vector field (FieldModel), and the PyTorch conventions:
``model(x)``, integer labels, DataLoaders, a custom activation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from eqprop import EnergyModel, FieldModel, PhiModel, PMLP, Phases, build_estimator, make_activation
from eqprop.build import build_optimizer
from eqprop.config import OptimConfig
from eqprop.data import BatchLoader, load_dataset
from eqprop.dynamics import run_phase
from eqprop.models.vf import VFMLP
from eqprop.training.loop import evaluate, train_epoch


class PhiMLP(PhiModel):
    """The P-MLP written as Φ only: it must give the closed-form model's estimates."""

    def __init__(self, reference: PMLP) -> None:
        sizes = reference.sizes
        super().__init__({f"s{n}": size for n, size in enumerate(sizes[1:], 1)}, activation=reference.activation)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.layers.load_state_dict(reference.layers.state_dict())

    def energy(self, x, s):
        below = [x] + list(s.values())[:-1]
        return sum((layer(b) * above).sum(1) for layer, b, above in zip(self.layers, below, s.values()))


class FieldMLP(FieldModel):
    """The VF-MLP written as its vector field: forward W, b and backward B of its own."""

    def __init__(self, reference: VFMLP) -> None:
        sizes = reference.sizes
        super().__init__({f"s{n}": size for n, size in enumerate(sizes[1:], 1)}, activation=reference.activation)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.layers.load_state_dict(reference.layers.state_dict())
        self.backward_weights = nn.ParameterList(
            nn.Parameter(pair.backward.detach().clone()) for pair in reference.backward_pairs())

    def field(self, x, s):
        states = list(s.values())
        below = [x] + states[:-1]
        pre = [layer(b) for layer, b in zip(self.layers, below)]
        for n, backward in enumerate(self.backward_weights):  # B_{n+1} s^{n+1} into layer n
            pre[n] = pre[n] + states[n + 1] @ backward.t()
        return dict(zip(s, pre))


def batch(inputs: int, classes: int, size: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(size, inputs, generator=g, dtype=torch.float64)
    return x, torch.randint(0, classes, (size,), generator=g)


def flat(direction) -> torch.Tensor:
    return torch.cat([d.flatten() for d in direction])


@pytest.mark.parametrize("name", ["one_sided", "symmetric", "random_sign", "bptt", "c_ep"])
def test_phi_model_gives_the_closed_form_estimates(name):
    reference = PMLP([10, 8, 6, 3], generator=torch.Generator().manual_seed(0)).double()
    user = PhiMLP(reference).double()
    x, labels = batch(10, 3)
    phases = Phases(40, 8, 0.2)
    options = {"lr": 0.01} if name == "c_ep" else {}
    a = build_estimator(name, phases, torch.Generator().manual_seed(2), **options).estimate(reference, x, labels)
    b = build_estimator(name, phases, torch.Generator().manual_seed(2), **options).estimate(user, x, labels)
    torch.testing.assert_close(flat(b.direction), flat(a.direction), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["vf", "symmetric_vf", "kp_vf", "c_vf", "bptt"])
def test_field_model_gives_the_closed_form_vf_estimates(name):
    reference = VFMLP([10, 8, 6, 3], generator=torch.Generator().manual_seed(0)).double()
    user = FieldMLP(reference).double()
    x, labels = batch(10, 3)
    phases = Phases(40, 8, 0.2)
    options = {"lr": 0.01} if name == "c_vf" else {}
    a = build_estimator(name, phases, **options).estimate(reference, x, labels).direction
    b = build_estimator(name, phases, **options).estimate(user, x, labels).direction
    # same parameters, listed forward weights first then B in both
    torch.testing.assert_close(flat(b), flat(a), rtol=1e-9, atol=1e-12)


def test_field_model_has_no_primitive_and_ep_refuses_it():
    user = FieldMLP(VFMLP([4, 3, 2])).double()
    with pytest.raises(TypeError, match="defined by its vector field and has no primitive Φ"):
        user.phi(torch.zeros(1, 4), user.init_state(torch.zeros(1, 4)))


def test_defaults_and_one_line_errors():
    class Tiny(PhiModel):
        def __init__(self, **kwargs):
            super().__init__({"h": 5, "y": 3}, **kwargs)
            self.w = nn.Linear(4, 5)
            self.v = nn.Linear(5, 3)

        def energy(self, x, s):
            return (self.w(x) * s["h"]).sum(1) + (self.v(s["h"]) * s["y"]).sum(1)

    model = Tiny()
    assert model.activation.name == "hard_sigmoid" and model.head.classes == 3
    assert [len(g) for g in model.layer_parameters()] == [2, 2]
    readout = Tiny(loss="ce", classes=7)
    assert readout.head.classes == 7 and [len(g) for g in readout.layer_parameters()] == [2, 2, 2]
    with pytest.raises(ValueError, match="classes: a softmax readout"):
        Tiny(loss="ce")
    with pytest.raises(ValueError, match="with loss mse the last layer is the output"):
        Tiny(classes=4)
    with pytest.raises(NotImplementedError, match="must define energy"):
        PhiModel({"y": 2}).phi(torch.zeros(1, 2), [torch.zeros(1, 2)])

    class Bare(EnergyModel):
        pass
    with pytest.raises(AttributeError, match="Bare has no head: set self.head in __init__, or subclass eqprop.PhiModel"):
        Bare().head


def test_model_call_runs_the_free_phase_and_returns_logits():
    model = PMLP([10, 8, 3], generator=torch.Generator().manual_seed(0)).double()
    x, _ = batch(10, 3)
    with torch.no_grad():
        expected = model.logits(run_phase(model, model.clamp(x), model.init_state(x), 25))
        assert torch.equal(model(x, steps=25), expected)


def test_a_custom_activation_is_one_function():
    relu6 = make_activation(lambda u: u.clamp(0.0, 6.0), name="relu6")
    u = torch.tensor([-1.0, 0.5, 3.0, 7.0])
    assert torch.equal(relu6.derivative(u), torch.tensor([0.0, 1.0, 1.0, 0.0]))

    class Relu6Net(PhiModel):
        def __init__(self):
            super().__init__({"h": 6, "y": 3}, activation=lambda u: u.clamp(0.0, 6.0) / 6.0)
            self.w, self.v = nn.Linear(4, 6), nn.Linear(6, 3)

        def energy(self, x, s):
            return (self.w(x) * s["h"]).sum(1) + (self.v(s["h"]) * s["y"]).sum(1)

    model = Relu6Net().double()
    x = torch.rand(3, 4, dtype=torch.float64)
    state = model.step(model.clamp(x), model.init_state(x))
    assert torch.equal(state[0], (model.w(x).clamp(0, 6) / 6).detach())


@pytest.fixture(scope="module")
def demo():
    return load_dataset("mnist-demo", "train")


def test_a_dataloader_trains_like_the_batch_loader(demo):
    """The same samples in the same order: a DataLoader of uint8 images and integer labels and the
    device-side BatchLoader give the same weights after an epoch, and the same evaluation."""
    x, y = demo.x[:120], demo.y[:120]
    runs = []
    for loader in (BatchLoader(type(demo)(x, y, 10, "demo"), 30, shuffle=False, device=torch.device("cpu"),
                               flatten=True),
                   DataLoader(TensorDataset(x, y), batch_size=30, shuffle=False)):
        model = PMLP([784, 20, 10], generator=torch.Generator().manual_seed(0))
        estimator = build_estimator("symmetric", Phases(10, 4, 0.2))
        optimizer = build_optimizer(OptimConfig(lr=0.05), model, ascend=True)
        stats = train_epoch(model, estimator, optimizer, loader, 1)
        runs.append((model.state_dict(), stats, evaluate(model, loader, t1=10)))
    (a, stats_a, eval_a), (b, stats_b, eval_b) = runs
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    assert stats_a.samples == stats_b.samples == 120
    assert eval_a[1] == eval_b[1] and abs(eval_a[0] - eval_b[0]) < 1e-5


def test_evaluate_takes_one_hot_targets_from_any_iterable():
    model = PMLP([10, 8, 3], generator=torch.Generator().manual_seed(0))
    x, labels = batch(10, 3, size=8)
    x = x.float()
    by_labels = evaluate(model, [(x, labels)], t1=10)
    by_one_hot = evaluate(model, [(x, F.one_hot(labels, 3).float())], t1=10)
    assert by_labels[:2] == by_one_hot[:2]
    with pytest.raises(TypeError, match=r"a loader must yield \(x, y\) pairs"):
        evaluate(model, [x], t1=10)
