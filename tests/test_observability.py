"""What a run tells besides its metrics: run.json per session, users' callbacks, TensorBoard."""
from __future__ import annotations

import importlib.util
import json

import pytest

from eqprop import validate_config
from eqprop.training.callbacks import Callback
from eqprop.training.metrics import read_metrics
from eqprop.training.trainer import train


def tiny_config(**train_options):
    return validate_config({"model": {"sizes": [784, 16, 10]}, "data": {"dataset": "mnist-demo", "train_subset": 100,
                                                                          "test_subset": 50},
                            "dynamics": {"t1": 5, "t2": 2}, "optim": {"lr": 0.05},
                            "train": {"epochs": 2, "batch_size": 25, "stop_at_chance": None, **train_options}})


class Recorder(Callback):
    def __init__(self):
        self.batches, self.epochs = [], []

    def on_batch(self, epoch, batch, estimate):
        self.batches.append((epoch, batch, estimate.free_stats.steps))

    def on_epoch(self, epoch, record):
        self.epochs.append(record)


def test_callbacks_see_every_batch_and_epoch_record(tmp_path):
    recorder = Recorder()
    records = train(tiny_config(), tmp_path / "run", log=lambda _: None, callbacks=[recorder])
    assert recorder.batches == [(epoch, batch, 5) for epoch in (1, 2) for batch in (1, 2, 3, 4)]
    assert recorder.epochs == records == read_metrics(tmp_path / "run" / "metrics.jsonl")


def test_run_json_records_each_session(tmp_path):
    train(tiny_config(epochs=1), tmp_path / "run", log=lambda _: None)
    train(tiny_config(epochs=2), tmp_path / "run", resume=True, log=lambda _: None)
    sessions = json.loads((tmp_path / "run" / "run.json").read_text())["sessions"]
    assert [s["first_epoch"] for s in sessions] == [1, 2]
    for session in sessions:
        assert session["torch"] and session["eqprop"] and session["host"] and session["started"]
        assert session["backend"] in ("c_kernel", "eager") and session["device"] == "cpu"


def test_tensorboard_scalars_or_a_one_line_error(tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        from eqprop import ConfigError
        with pytest.raises(ConfigError, match=r"pip install 'eqprop\[tensorboard\]'"):
            train(tiny_config(tensorboard=True), tmp_path / "run", log=lambda _: None)
        return
    train(tiny_config(tensorboard=True), tmp_path / "run", log=lambda _: None)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    test_error = [event.value for event in events.Scalars("test_error")]
    assert test_error == pytest.approx([r["test_error"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")])


def test_compare_prints_a_table_and_writes_a_plot(tmp_path, capsys):
    from eqprop.cli import main
    for seed in (0, 1):
        train(validate_config({**tiny_config(epochs=1, seed=seed).model_dump(mode="json"), "name": f"tiny{seed}"}),
              tmp_path / f"run{seed}", log=lambda _: None)
    assert main(["compare", str(tmp_path / "run0"), str(tmp_path / "run1"), "--plot", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "| run | name | epochs | test error |" in out and "tiny0" in out and "tiny1" in out
    assert (tmp_path / "c.png").stat().st_size > 0
    assert main(["compare", str(tmp_path)]) == 1
    assert "holds no recorded epoch" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "run0"), str(tmp_path / "typo")]) == 1
    assert "typo is not a run folder (no such folder)" in capsys.readouterr().err
