"""Optimizers built to ascend (``maximize=True``) take ∇̂ itself and make the same steps as
ordinary optimizers given ``p.grad = -∇̂``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eqprop.config import validate_config
from eqprop.estimators import Phases, build_estimator
from eqprop.models import PMLP
from eqprop.presets import load_preset
from eqprop.training import load_checkpoint, train

PHASES = Phases(t1=12, t2=4, beta=0.2)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 20, generator=g, dtype=torch.float64)
    return x, F.one_hot(torch.randint(0, 5, (16,), generator=g), 5).double()


@pytest.mark.parametrize("make", [
    lambda params, maximize: torch.optim.Adam(params, lr=0.01, weight_decay=1e-3, maximize=maximize),
    lambda params, maximize: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3,
                                             maximize=maximize),
])
@pytest.mark.parametrize("estimator", ["symmetric", "one_sided", "bptt"])
def test_ascending_optimizers_make_the_same_steps(make, estimator):
    torch.manual_seed(0)
    plain = PMLP([20, 15, 5]).double()
    ascending = PMLP([20, 15, 5]).double()
    ascending.load_state_dict(plain.state_dict())
    runs = [(plain, make(plain.parameters(), False)), (ascending, make(ascending.parameters(), True))]
    est = build_estimator(estimator, PHASES)
    for step in range(3):
        x, target = batch(step)
        results = [est.train_step(model, x, target, optimizer) for model, optimizer in runs]
        for p, q, d in zip(plain.parameters(), ascending.parameters(), results[1].direction):
            assert torch.equal(p, q)
            assert torch.equal(p.grad, -q.grad)
            assert q.grad is d  # the direction itself, no copy
        assert all(torch.equal(u, v) for u, v in zip(results[0].direction, results[1].direction))


@pytest.mark.parametrize("preset,ascends", [("demo", True), ("cep-1h", False)])
def test_the_trainer_builds_ascending_optimizers_except_for_continual_estimators(preset, ascends, tmp_path):
    data = load_preset(preset)
    data["data"].update(dataset="mnist-demo", train_subset=100, test_subset=50)
    data["train"].update(epochs=1, device="cpu")
    data["dynamics"].update(t1=5, t2=2)
    train(validate_config(data), tmp_path / "run", log=lambda _: None)
    groups = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["optimizer"]["param_groups"]
    assert [group["maximize"] for group in groups] == [ascends] * len(groups)
