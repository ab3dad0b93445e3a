"""The divergence guard: a run that collapses after having learned stops with one line and the
checkpoint of the epoch before, or rolls back to it at lower learning rates (train.on_collapse)."""
from __future__ import annotations

import json

import pytest
import torch

from eqprop.estimators import SymmetricEP
from eqprop.training import load_checkpoint, train
from eqprop.training.checkpoint import BEST_CHECKPOINT, CHECKPOINT
from eqprop.training.collapse import collapse_reason
from eqprop.training.trainer import CollapseError

from test_cli import FAST
from test_run_folder import run
from test_training import quiet, small_config

BATCHES = 20  # small_config: 400 training images in batches of 20


def saturating(monkeypatch, every_time: bool):
    """Set every weight to 5 after the last batch of epoch 2 (``every_time``: of every epoch from the
    second on): every unit saturates, every input gets the same output, the test error goes to
    chance without any NaN."""
    original = SymmetricEP.estimate
    calls = []

    def poisoned(self, model, x, target, *args, **kwargs):
        result = original(self, model, x, target, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2 * BATCHES or (every_time and len(calls) > 2 * BATCHES and len(calls) % BATCHES == 0):
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(5.0)
        return result

    monkeypatch.setattr(SymmetricEP, "estimate", poisoned)
    return calls


@pytest.fixture
def saturate_once(monkeypatch):
    return saturating(monkeypatch, every_time=False)


@pytest.fixture
def saturate_always(monkeypatch):
    return saturating(monkeypatch, every_time=True)


def test_a_collapse_is_an_epoch_back_at_chance_after_having_learned():
    learned = [{"epoch": 1, "test_error": 0.30}, {"epoch": 2, "test_error": 0.05}]
    assert "collapsed" in collapse_reason(3, learned, 0.88, chance=0.9)
    assert "epoch 3" in collapse_reason(3, learned, 0.88, chance=0.9)
    assert collapse_reason(3, learned, 0.80, chance=0.9) is None          # bad, but not at chance
    assert collapse_reason(3, [{"epoch": 1, "test_error": 0.6}], 0.9, chance=0.9) is None  # never learned
    assert collapse_reason(1, [], 0.9, chance=0.9) is None


def test_a_collapsed_run_stops_in_one_line_with_the_checkpoint_of_the_epoch_before(tmp_path, saturate_once):
    train(small_config(train={"epochs": 1}), tmp_path / "good", log=quiet)
    good = load_checkpoint(tmp_path / "good" / CHECKPOINT)["model"]
    saturate_once.clear()
    with pytest.raises(CollapseError) as caught:
        train(small_config(train={"epochs": 3}), tmp_path / "run", log=quiet)
    message = str(caught.value)
    assert "\n" not in message and "epoch 2: the test error" in message and "collapsed" in message
    assert f"{CHECKPOINT} keeps epoch 1" in message and "train.on_collapse=rollback" in message
    kept = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert kept["epoch"] == 1 and all(torch.equal(kept["model"][k], good[k]) for k in good)
    assert load_checkpoint(tmp_path / "run" / BEST_CHECKPOINT)["epoch"] == 1
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_rollback_goes_back_to_the_best_epoch_at_lower_rates_and_resumes_exactly(tmp_path, saturate_once):
    settings = {"on_collapse": "rollback", "rollback_lr_factor": 0.25}
    records = train(small_config(train={"epochs": 3, **settings}), tmp_path / "whole", log=quiet)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    metrics = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in metrics] == [1, 2, 3]
    assert "rollback" not in records[0] and "rollback" not in records[2]
    rollback = records[1]["rollback"]
    assert rollback["rollbacks"] == 1 and rollback["from_epoch"] == 2 and rollback["lr_scale"] == 0.25
    assert "collapsed" in rollback["reason"]
    assert records[1]["lr"] == pytest.approx([0.25 * lr for lr in records[0]["lr"]])
    assert records[2]["lr"] == records[1]["lr"] and records[1]["test_error"] < 0.5
    assert load_checkpoint(tmp_path / "whole" / CHECKPOINT)["rollbacks"] == 1
    undone = [json.loads(line) for line in (tmp_path / "whole" / "rolled_back.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["rollback"]) for r in undone] == [(2, 1)] and "collapsed" in undone[0]["collapse"]

    saturate_once.clear()
    train(small_config(train={"epochs": 2, **settings}), tmp_path / "pieces", log=quiet)
    resumed = train(small_config(train={"epochs": 3, **settings}), tmp_path / "pieces", resume=True, log=quiet)
    assert resumed[2] | {"epoch_seconds": 0, "samples_per_second": 0} == \
        records[2] | {"epoch_seconds": 0, "samples_per_second": 0}
    whole, pieces = (load_checkpoint(tmp_path / name / CHECKPOINT)["model"] for name in ("whole", "pieces"))
    assert all(torch.equal(whole[k], pieces[k]) for k in whole)


def test_a_run_that_keeps_collapsing_stops_after_its_rollbacks_rewound_to_the_best(capsys, tmp_path, saturate_always):
    settings = {"on_collapse": "rollback", "max_rollbacks": 2}
    with pytest.raises(CollapseError) as caught:
        train(small_config(train={"epochs": 4, **settings}), tmp_path, log=print)
    message = str(caught.value)
    assert "\n" not in message and "2 rollback(s) made, train.max_rollbacks is 2" in message
    assert f"{CHECKPOINT} keeps epoch 1" in message
    assert capsys.readouterr().out.count("rolled back to epoch 1 (the best)") == 2
    kept = load_checkpoint(tmp_path / CHECKPOINT)
    assert kept["epoch"] == 1 and kept["rollbacks"] == 2 and kept["lr_scale"] == 0.25
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_healthy_run_is_the_same_whatever_its_collapse_policy(tmp_path):
    runs = {policy: train(small_config(train={"epochs": 2, "on_collapse": policy}), tmp_path / policy, log=quiet)
            for policy in ("stop", "rollback", "continue")}
    errors = {policy: [r["test_error"] for r in records] for policy, records in runs.items()}
    assert errors["stop"] == errors["rollback"] == errors["continue"]
    models = [load_checkpoint(tmp_path / policy / CHECKPOINT)["model"] for policy in runs]
    assert all(torch.equal(models[0][k], other[k]) for other in models[1:] for k in models[0])


def test_an_absurd_learning_rate_stops_in_one_line_with_nothing_to_roll_back_to(capsys, tmp_path):
    out = tmp_path / "run"
    status, _, err = run(capsys, "train", "--out", str(out), "--epochs", "2", *FAST, "--set", "optim.name=sgd",
                         "--set", "optim.lr=[1e38, 1e38]", "--set", "train.on_collapse=rollback")
    assert status == 1 and err.count("\n") == 1
    assert "diverged in epoch 1" in err and "nothing was saved" in err and f"no {BEST_CHECKPOINT} to roll back to" in err
    assert not (out / CHECKPOINT).exists()
