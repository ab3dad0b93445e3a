"""A time limit ends a run at an epoch boundary, resumable, before a batch job's wall clock kills it."""
from __future__ import annotations

import pytest

from eqprop.cli import main
from eqprop.training import load_checkpoint, train
from eqprop.training.time_limit import EXIT_TIME_LIMIT, TimeLimit, parse_duration
from eqprop.training.trainer import CHECKPOINT
from test_training import quiet, small_config


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("50m", 3000), ("1.5h", 5400), ("20", 1200),
                                           (" 2 h ", 7200), (".5m", 30)])
def test_durations_are_read_with_minutes_by_default(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "5d", "0", "0s", "-5m", "1h30m", "nan"])
def test_a_bad_duration_is_one_line(text):
    with pytest.raises(ValueError, match="duration|positive"):
        parse_duration(text)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_another_epoch_fits_while_the_longest_recent_epoch_does():
    clock = Clock()
    limit = TimeLimit(100, clock)
    clock.now += 5                       # start-up counts against the limit
    assert limit.another_epoch_fits()    # the first epoch always runs: nothing predicts it
    for took, fits in ((20, True), (30, True), (10, True), (10, False)):
        clock.now += took
        assert limit.another_epoch_fits() is fits
    # after 5 + 20 + 30 + 10 = 65 s the next epoch is expected to take 30 s (the longest of the last
    # three): 95 s fits; after another 10 s, 75 + 30 = 105 s does not
    assert limit.expected_epoch() == 30
    clock = Clock()
    limit = TimeLimit(100, clock)
    limit.another_epoch_fits()
    for took in (30, 10, 10, 10):
        clock.now += took
        limit.another_epoch_fits()
    assert limit.expected_epoch() == 10  # the 30 s epoch has left the window of three


def test_a_run_stopped_at_its_time_limit_resumes_like_one_never_stopped(tmp_path):
    config = small_config(train={"epochs": 3})
    full = train(config, tmp_path / "full", log=quiet)
    messages: list[str] = []
    stopped = train(config, tmp_path / "split", log=messages.append, time_limit=1e-3)
    assert [r["epoch"] for r in stopped] == [1]
    assert load_checkpoint(tmp_path / "split" / CHECKPOINT)["epoch"] == 1
    assert any(m.startswith("time limit 0.001s: stopping after epoch 1 of 3") for m in messages)
    resumed = train(config, tmp_path / "split", resume=True, log=quiet)
    strip = lambda records: [{k: v for k, v in r.items() if k not in ("epoch_seconds", "samples_per_second")}
                             for r in records]
    assert strip(resumed) == strip(full)


def test_the_command_exits_75_and_says_how_to_continue(capsys, tmp_path):
    argv = ["train", "--epochs", "2", "--train-subset", "100", "--test-subset", "50", "--no-progress",
            "--set", "dynamics.t1=5", "--set", "dynamics.t2=2", "--out", str(tmp_path / "run")]
    assert main(argv + ["--time-limit", "0.01s"]) == EXIT_TIME_LIMIT
    out = capsys.readouterr().out
    assert "stopped at the time limit after epoch 1 of 2" in out and f"--resume {tmp_path / 'run'}" in out
    assert main(["train", "--resume", str(tmp_path / "run"), "--time-limit", "1h", "--no-progress"]) == 0
    assert "done: test error" in capsys.readouterr().out
    assert main(argv[:1] + ["--time-limit", "soon"]) == 2
    assert "--time-limit: 'soon' is not a duration" in capsys.readouterr().err
