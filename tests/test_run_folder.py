"""A run folder nothing can corrupt: one writer, verified checkpoints, resume that keeps its target,
runs that stop when they do not learn, and messages that say only what is true."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from eqprop.cli import main
from eqprop.training import load_checkpoint, save_checkpoint, train
from eqprop.training.checkpoint import BEST_CHECKPOINT, CHECKPOINT, CheckpointError
from eqprop.training.run_lock import RunLock, RunLockedError

from test_cli import FAST
from test_training import quiet, small_config


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def eqprop(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "eqprop", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def flip_byte(path, offset_fraction=0.5):
    content = bytearray(path.read_bytes())
    content[int(len(content) * offset_fraction)] ^= 0x10
    path.write_bytes(bytes(content))


# -- one writer -------------------------------------------------------------------------------
def test_a_locked_folder_refuses_a_second_writer_naming_the_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=r"in use by another eqprop run \(pid \d+ on .+, since .+UTC\)"):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):   # released with its holder
        pass


def test_two_processes_racing_for_one_folder_one_trains_the_other_stops_at_once(tmp_path):
    out = str(tmp_path / "run")
    argv = ["train", "--out", out, "--epochs", "30", *FAST]   # long enough for the two to overlap
    first, second = eqprop(*argv), eqprop(*argv)
    results = [(p.wait(timeout=300), p.stderr.read()) for p in (first, second)]
    statuses = sorted(status for status, _ in results)
    assert statuses == [0, 1], results
    loser = next(err for status, err in results if status == 1)
    assert loser.count("\n") == 1 and "in use by another eqprop run (pid" in loser
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 31))


# -- verified checkpoints -------------------------------------------------------------------------
def test_a_bit_flipped_checkpoint_is_refused_in_one_line(capsys, tmp_path):
    out = tmp_path / "run"
    assert run(capsys, "train", "--out", str(out), "--epochs", "1", *FAST)[0] == 0
    flip_byte(out / CHECKPOINT)
    status, _, err = run(capsys, "eval", "--checkpoint", str(out / CHECKPOINT))
    assert status == 1 and err.count("\n") == 1 and "damaged" in err
    status, _, err = run(capsys, "train", "--resume", str(out), "--epochs", "2", "--no-progress")
    assert status == 1 and err.count("\n") == 1 and "damaged" in err


def test_a_checkpoint_of_another_run_cannot_take_a_folder_over(capsys, tmp_path):
    mine, other = tmp_path / "mine", tmp_path / "other"
    assert run(capsys, "train", "--out", str(mine), "--epochs", "1", *FAST)[0] == 0
    assert run(capsys, "train", "--out", str(other), "--epochs", "1", *FAST, "--set", "model.sizes=[784,64,10]")[0] == 0
    (mine / CHECKPOINT).write_bytes((other / CHECKPOINT).read_bytes())
    before = (mine / "metrics.jsonl").read_text()
    status, _, err = run(capsys, "train", "--resume", str(mine), "--epochs", "2", "--no-progress")
    assert status == 1 and err.count("\n") == 1 and "holds the model of another run" in err
    assert (mine / "metrics.jsonl").read_text() == before


def test_a_state_with_nan_never_replaces_a_checkpoint(tmp_path):
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(3)}})
    with pytest.raises(CheckpointError, match=r"was not written: the checkpoint\['model'\]\['w'\] holds NaN or inf"):
        save_checkpoint(path, {"epoch": 2, "model": {"w": torch.tensor([1.0, float("nan"), 0.0])}})
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]   # no temporary left behind


def test_a_checkpoint_costs_its_tensors_and_one_of_the_previous_format_still_loads(tmp_path):
    import hashlib
    import io
    weights = {"epoch": 3, "model": {"w": torch.randn(250_000)}}   # 1 MB of float32
    save_checkpoint(tmp_path / "new.pt", weights)
    # stored raw: pickled bytes (format 2) took 1.5 times as much
    assert (tmp_path / "new.pt").stat().st_size < 1.02e6
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    content = buffer.getvalue()
    torch.save({"format": "eqprop-checkpoint", "version": 2, "digest": hashlib.sha256(content).hexdigest(),
                "fingerprint": None, "content": content}, tmp_path / "old.pt")
    assert (tmp_path / "old.pt").stat().st_size > 1.3e6
    for name in ("new.pt", "old.pt"):
        assert torch.equal(load_checkpoint(tmp_path / name)["model"]["w"], weights["model"]["w"])


def test_a_file_of_other_objects_is_refused_without_being_unpickled(capsys, tmp_path):
    path = tmp_path / "hostile.pt"
    torch.save({"format": "eqprop-checkpoint", "version": 2, "payload": torch.optim.SGD}, path)
    status, _, err = run(capsys, "eval", "--checkpoint", str(path))
    assert status == 1 and err.count("\n") == 1
    assert "Python objects other than tensors and plain values" in err


# -- resume semantics -------------------------------------------------------------------------------
def test_resume_keeps_the_target_changes_it_on_demand_and_knows_a_finished_run(capsys, tmp_path):
    out = tmp_path / "run"
    config = small_config(train={"epochs": 3})
    first = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 1})})
    train(first, out, log=quiet)
    # a run of 3 epochs whose first one is done (its checkpoint records the target 3)
    payload = load_checkpoint(out / CHECKPOINT)
    payload["config"]["train"]["epochs"] = 3
    save_checkpoint(out / CHECKPOINT, payload)
    status, out_text, _ = run(capsys, "train", "--resume", str(out), "--no-progress")
    assert status == 0 and "epoch 3/3" in out_text
    status, out_text, _ = run(capsys, "train", "--resume", str(out), "--no-progress")
    assert status == 0 and out_text.count("\n") == 1 and "is finished: epoch 3 of 3" in out_text
    status, out_text, _ = run(capsys, "train", "--resume", str(out), "--epochs", "4", "--no-progress")
    assert status == 0 and "changes from 3 to 4 epochs" in out_text and "epoch 4/4" in out_text
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


def test_sigterm_ends_the_run_cleanly_and_says_how_to_continue(tmp_path):
    out = tmp_path / "run"
    process = eqprop("train", "--out", str(out), "--epochs", "50", *FAST)
    deadline = time.monotonic() + 120
    while not (out / CHECKPOINT).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    saved = load_checkpoint(out / CHECKPOINT)["epoch"]
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"terminated; the epoch in progress is abandoned and epoch {saved} is saved" in err
    assert f"eqprop train --resume {out}'" in err


# -- runs that do not learn ---------------------------------------------------------------------
def test_a_run_at_chance_level_stops_with_one_line_and_keeps_its_checkpoints(capsys, tmp_path):
    out = tmp_path / "run"
    status, _, err = run(capsys, "train", "--out", str(out), "--epochs", "20", *FAST, "--set", "optim.name=adam",
                         "--set", "optim.lr=[1e6, 1e6]", "--set", "train.stop_at_chance=2")
    assert status == 1 and err.count("\n") == 1
    assert "the training error stayed at chance level" in err and "for 2 epochs" in err
    kept = load_checkpoint(out / CHECKPOINT)["epoch"]
    assert kept >= 2 and f"{CHECKPOINT} keeps epoch {kept}" in err
    assert (out / BEST_CHECKPOINT).exists() and BEST_CHECKPOINT in err


def test_a_learning_run_is_not_stopped(tmp_path):
    records = train(small_config(train={"epochs": 3, "stop_at_chance": 1}), tmp_path, log=quiet)
    assert len(records) == 3


def test_a_divergence_in_the_first_epoch_promises_no_checkpoint(capsys, tmp_path):
    out = tmp_path / "run"
    status, _, err = run(capsys, "train", "--out", str(out), "--epochs", "2", *FAST, "--set", "optim.name=sgd",
                         "--set", "optim.lr=[1e38, 1e38]")
    assert status == 1 and err.count("\n") == 1
    assert "nothing was saved (no epoch was completed)" in err and "kept" not in err


# -- messages ----------------------------------------------------------------------------------
def test_eval_and_gdu_take_a_run_folder(capsys, tmp_path):
    out = tmp_path / "run"
    assert run(capsys, "train", "--out", str(out), "--epochs", "1", *FAST)[0] == 0
    status, text, _ = run(capsys, "eval", "--checkpoint", str(out))
    assert status == 0 and text.startswith("epoch 1: test error")
    status, _, err = run(capsys, "gdu", "--checkpoint", str(out), "--out", str(tmp_path / "gdu"), "--batch-size", "4",
                         "--t1", "20", "--k", "4")
    assert status == 0, err


def test_a_mismatched_state_is_described_in_one_whole_line(tmp_path):
    from eqprop.models import PMLP
    from eqprop.training.checkpoint import load_model_state
    state = PMLP([6, 5, 3]).state_dict()
    with pytest.raises(CheckpointError) as caught:
        load_model_state(PMLP([6, 4, 3]), state, tmp_path / "x.pt")
    message = str(caught.value)
    assert "\n" not in message
    assert "layers.0.weight is [5, 6] there, [4, 6] here" in message and "layers.1.weight is [3, 5] there" in message
