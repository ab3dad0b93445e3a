"""Solvers in whole runs: configured from the command line, reported per epoch, resumed exactly,
with a warm start that keeps each sample's steady state from one epoch to the next."""
from __future__ import annotations

import json

import pytest
import torch

from eqprop.cli import main
from eqprop.estimators import Phases, build_estimator
from eqprop.models import PMLP
from eqprop.solvers import WarmStart, build_solver
from eqprop.training import train
from eqprop.training.trainer import CHECKPOINT, WARM_START

from test_training import assert_resumed_run_equals_uninterrupted_run, quiet, small_config

STEP_KEYS = ("free_steps", "free_steps_max", "free_residual", "free_capped", "nudged_steps", "nudged_steps_max",
             "nudged_residual", "test_free_steps")


def test_the_command_line_trains_with_a_solver_and_records_its_steps(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--epochs", "1", "--train-subset", "300", "--test-subset", "200", "--out", str(out),
                 "--no-progress", "--set", "solver.name=anderson", "--set", "solver.tol=1e-4",
                 "--set", "dynamics.t1=60"])
    assert code == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    for key in STEP_KEYS:
        assert key in record, key
    assert record["free_steps"] < 60 and record["free_capped"] == 0.0
    assert record["free_residual"] <= 1e-4
    assert "steps: free" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(out / CHECKPOINT), "--set", "solver.name=fixed"]) == 0
    assert "free phase 60.0 steps" in capsys.readouterr().out


def test_a_fixed_run_records_the_papers_steps_and_the_residual_they_leave(tmp_path):
    record = train(small_config(train={"epochs": 1}), tmp_path, log=quiet)[0]
    assert record["free_steps"] == record["free_steps_max"] == 12
    assert record["nudged_steps"] == 4 and record["free_capped"] == 0.0
    assert record["free_residual"] > 0


def test_a_solver_run_reaches_the_fixed_runs_error(tmp_path):
    config = small_config(dynamics={"t1": 80}, train={"epochs": 2})
    fixed = train(config, tmp_path / "fixed", log=quiet)
    fast = train(small_config(dynamics={"t1": 80}, train={"epochs": 2},
                              solver={"name": "anderson", "sweep": "alternating", "tol": 1e-5}),
                 tmp_path / "fast", log=quiet)
    assert fast[-1]["free_steps"] < fixed[-1]["free_steps"] / 3
    assert abs(fast[-1]["test_error"] - fixed[-1]["test_error"]) <= 0.02


@pytest.mark.parametrize("solver", [{"name": "tolerance", "tol": 1e-4, "warm_start": True},
                                    {"name": "anderson", "tol": 1e-4}])
def test_a_resumed_solver_run_equals_an_uninterrupted_one(tmp_path, solver):
    assert_resumed_run_equals_uninterrupted_run(small_config(solver=solver, train={"epochs": 3}), tmp_path)


def test_a_warm_start_without_its_saved_states_starts_cold_and_says_so(tmp_path):
    config = small_config(solver={"name": "tolerance", "warm_start": True}, train={"epochs": 1})
    train(config, tmp_path, log=quiet)
    (tmp_path / WARM_START).write_bytes(b"damaged")
    messages = []
    two = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 2})})
    records = train(two, tmp_path, resume=True, log=messages.append)
    assert [r["epoch"] for r in records] == [1, 2]
    assert any(m.startswith("warm start: the saved states cannot be used") for m in messages)


def test_warm_start_gives_each_sample_its_last_steady_state():
    model = PMLP([6, 5, 3], generator=torch.Generator().manual_seed(0)).double()
    warm = WarmStart(samples=10)
    x = torch.rand(4, 6, dtype=torch.float64)
    indices = torch.tensor([7, 2, 9, 0])
    assert all(torch.equal(s, z) for s, z in zip(warm.start(model, x, indices), model.init_state(x)))
    state = [torch.rand(4, 5, dtype=torch.float64)]
    warm.keep(indices, state)
    again = warm.start(model, x[[1, 3]], torch.tensor([2, 0]))[0]
    torch.testing.assert_close(again, state[0][[1, 3]], rtol=0, atol=1e-3)   # float16 storage
    cold = warm.start(model, x[:1], torch.tensor([5]))[0]
    assert torch.equal(cold, torch.zeros(1, 5, dtype=torch.float64))
    assert warm.bytes == 10 * 5 * 2


def test_a_warm_start_shortens_the_free_phase_of_a_settled_network():
    """From its own steady state, a sample whose weights have not moved needs one check."""
    model = PMLP([8, 6, 3], generator=torch.Generator().manual_seed(0)).double()
    x = torch.rand(5, 8, dtype=torch.float64)
    target = torch.eye(3, dtype=torch.float64)[[0, 1, 2, 0, 1]]
    estimator = build_estimator("symmetric", Phases(100, 20, 0.1, build_solver("tolerance", tol=1e-8, check_every=1)))
    cold = estimator.estimate(model, x, target)
    warm = estimator.estimate(model, x, target, start=cold.free_state)
    assert warm.free_stats.steps == 1 < cold.free_stats.steps
    for a, b in zip(warm.direction, cold.direction):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_warm_start_needs_an_estimator_that_takes_a_start(monkeypatch):
    from eqprop.build import build_run
    from eqprop.config import ConfigError
    from eqprop.estimators.symmetric import SymmetricEP

    def estimate(self, model, x, target):   # an estimator written before warm starts existed
        raise AssertionError("not called")
    monkeypatch.setattr(SymmetricEP, "estimate", estimate)
    with pytest.raises(ConfigError, match="solver.warm_start: estimator symmetric takes no start state"):
        build_run(small_config(solver={"name": "tolerance", "warm_start": True}), with_data=False)
