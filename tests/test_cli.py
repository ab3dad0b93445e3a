"""The command line: exit statuses, one-line errors, presets, train/resume/eval."""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import time

import pytest

from eqprop.cli import main
from eqprop.presets import load_preset, preset_names
from eqprop.config import validate_config

FAST = ["--train-subset", "200", "--test-subset", "100", "--set", "dynamics.t1=8", "--set", "dynamics.t2=3",
        "--no-progress", "--threads", "1"]


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("argv, key", [
    (["--set", "dynamics.beta=-0.5"], "dynamics.beta"),
    (["--set", "train.batch_size=0"], "train.batch_size"),
    (["--set", "model.nonsense=3"], "model.nonsense"),
    (["--set", "estimator.name=magic"], "estimator.name"),
    (["--set", "optim.lr=[0.1]"], "optim.lr"),
    (["--set", "model.sizes=[784,10,10]", "--set", "model.loss=ce", "--set", "model.activation=relu"], "model.activation"),
    (["--epochs", "0"], "train.epochs"),
    (["--preset", "no-such-preset"], "no-such-preset"),
    (["--set", "oops"], "dotted.key=value"),
    (["--set", "model={kind:cnn}"], "a colon needs a space"),  # YAML reads 'kind:cnn' as one key
    (["--set", "model.backward=separate"], "estimator.name"),  # symmetric EP needs Φ
    (["--set", "model.backward=separate", "--set", "estimator.name=kp_vf", "--set", "model.loss=ce"],
     "model.backward"),  # no layer with top-down input
    (["--set", "estimator.name=c_ep"], "optim"),  # C-EP moves the weights with plain SGD, not Adam
    (["--set", "estimator.name=c_vf", "--set", "optim.name=sgd"], "estimator.name"),  # C-VF needs B
])
def test_bad_configuration_exits_2_with_one_line(capsys, tmp_path, argv, key):
    status, _, err = run(capsys, "train", "--out", str(tmp_path / "run"), *argv)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("eqprop: error:") and key in err


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "train.threads: Input should be 'auto' or greater than 0"),
    (["--set", "optim.lr=[0.1,-1]"], "optim.lr.1: Input should be greater than 0"),  # the list's bad item
    (["--set", "optim.lr=abc"], "optim.lr: Input should be a valid number, unable to parse string as a number "
                                "or a valid list"),
    (["--set", "model.odd:key=1"], "model.odd:key: unknown key of model kind 'mlp'"),  # an odd key is no union member
])
def test_a_value_no_member_of_a_union_accepts_is_named_by_its_key(capsys, tmp_path, argv, message):
    status, _, err = run(capsys, "train", "--out", str(tmp_path / "run"), *argv)
    assert status == 2 and err == f"eqprop: error: invalid configuration: {message}\n"


def test_usage_error_exits_2(capsys):
    status, _, err = run(capsys, "train", "--bogus")
    assert status == 2 and err.count("\n") == 1
    status, _, err = run(capsys, "train", "--preset", "demo", "--config", "x.yaml")
    assert status == 2 and err.count("\n") == 1


def test_resume_with_another_out_folder_exits_2(capsys, tmp_path):
    status, _, err = run(capsys, "train", "--preset", "demo", "--resume", str(tmp_path / "a"),
                         "--out", str(tmp_path / "b"))
    assert status == 2 and "leave out --out" in err and not any(tmp_path.iterdir())


def test_bad_config_file_exits_2(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    status, _, err = run(capsys, "train", "--config", str(broken))
    assert status == 2 and "not valid YAML" in err
    status, _, err = run(capsys, "train", "--config", str(tmp_path / "missing.yaml"))
    assert status == 2 and "cannot read" in err
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00model")
    status, _, err = run(capsys, "train", "--config", str(binary))
    assert status == 2 and err.count("\n") == 1 and "is not UTF-8 text" in err


def test_missing_data_exits_1_and_says_what_to_do(capsys, tmp_path):
    status, _, err = run(capsys, "train", "--preset", "ep-1h", "--data-dir", str(tmp_path), "--out",
                         str(tmp_path / "run"), *FAST)
    assert status == 1 and err.count("\n") == 1 and "--download" in err
    assert not (tmp_path / "run").exists()  # a failed start leaves no empty run folder behind


def test_corrupt_data_exits_1(capsys, tmp_path, data_root):
    (tmp_path / "mnist").mkdir()
    for f in (data_root / "mnist").iterdir():
        shutil.copy(f, tmp_path / "mnist" / f.name)
    target = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(target.read_bytes()))
    content[100] ^= 1
    target.write_bytes(gzip.compress(bytes(content)))
    status, _, err = run(capsys, "train", "--preset", "ep-1h", "--data-dir", str(tmp_path), "--out",
                         str(tmp_path / "run"), *FAST)
    assert status == 1 and err.count("\n") == 1 and "t10k-labels" in err


def test_presets_are_listed_and_valid(capsys):
    status, out, _ = run(capsys, "presets")
    assert status == 0
    names = preset_names()
    assert {"demo", "laborieux-mnist", "ep-1h", "ep-2h"} <= set(names)
    assert len(out.splitlines()) == len(names)
    for name in names:
        validate_config(load_preset(name))


def test_train_resume_eval_on_real_mnist(capsys, tmp_path, data_root):
    out = tmp_path / "run"
    common = ["--preset", "laborieux-mnist", "--data-dir", str(data_root), *FAST]
    status, stdout, _ = run(capsys, "train", *common, "--epochs", "1", "--out", str(out))
    assert status == 0 and "epoch 1/1" in stdout
    status, stdout, _ = run(capsys, "train", "--resume", str(out), "--epochs", "2", "--no-progress")
    assert status == 0 and "resuming" in stdout and "epoch 2/2" in stdout and "epoch 1/2" not in stdout
    status, stdout, _ = run(capsys, "eval", "--checkpoint", str(out / "checkpoint.pt"), "--data-dir", str(data_root),
                            "--test-subset", "100")
    assert status == 0 and "epoch 2: test error" in stdout


def test_eval_refuses_a_file_that_is_not_a_checkpoint(capsys, tmp_path):
    bogus = tmp_path / "checkpoint.pt"
    bogus.write_bytes(b"not a checkpoint at all")
    status, _, err = run(capsys, "eval", "--checkpoint", str(bogus))
    assert status == 1 and err.count("\n") == 1 and "checkpoint" in err


def test_entry_point_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "eqprop", "train", "--set", "dynamics.t1=-3", "--out",
                             str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "dynamics.t1" in result.stderr


def test_interrupted_run_says_how_to_continue(capsys, tmp_path, monkeypatch):
    import eqprop.training.trainer as trainer

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupt)
    status, _, err = run(capsys, "train", "--out", str(tmp_path / "run"), *FAST)
    assert status == 130 and "nothing was saved" in err


def test_sigint_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    import signal
    import time

    import torch

    from eqprop.training import load_checkpoint, train

    out = tmp_path / "interrupted"
    argv = [sys.executable, "-m", "eqprop", "train", "--out", str(out), "--epochs", "50", *FAST]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    epochs = load_checkpoint(out / "checkpoint.pt")["epoch"] + 1
    resumed = subprocess.run([sys.executable, "-m", "eqprop", "train", "--resume", str(out), "--epochs",
                              str(epochs), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    config = validate_config(load_checkpoint(out / "checkpoint.pt")["config"])
    train(config, tmp_path / "straight", log=lambda _: None)
    a = load_checkpoint(out / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_without_a_c_compiler_training_warns_in_one_line_and_runs(capsys, tmp_path, monkeypatch):
    from eqprop.cpu_kernels import forget_loaded_kernels
    monkeypatch.setenv("CC", str(tmp_path / "no-compiler"))
    forget_loaded_kernels()
    try:
        status, _, err = run(capsys, "train", "--out", str(tmp_path / "run"), "--epochs", "1", "--device", "cpu",
                             *FAST)
    finally:
        forget_loaded_kernels()
    assert status == 0
    warning = [line for line in err.splitlines() if "C compiler" in line]
    assert warning == [f"eqprop: warning: the C compiler '{tmp_path / 'no-compiler'}' named by CC was not found; "
                       "the phases run in PyTorch instead"]


def test_a_ctrl_c_that_a_library_turned_into_an_error_still_interrupts(capsys, tmp_path, monkeypatch):
    """A Ctrl-C during the import of a compiled module surfaces as ImportError (pybind11), or
    is swallowed by code that catches that: the run must still end as interrupted (130)."""
    import signal

    import eqprop.training.trainer as trainer

    def interrupted_import(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
        except KeyboardInterrupt:
            raise ImportError("initialization failed") from None

    monkeypatch.setattr(trainer, "train", interrupted_import)
    status, _, err = run(capsys, "train", "--out", str(tmp_path / "run"), *FAST)
    assert status == 130
    assert "interrupted before the first epoch ended" in err and "ImportError" not in err


def test_a_swallowed_ctrl_c_stops_the_run_at_the_next_epoch(capsys, tmp_path, monkeypatch):
    import signal

    import eqprop.training.trainer as trainer

    def swallowing_train(*args, log, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            pass  # lost by library code
        log("epoch 1/2 ...")  # raises KeyboardInterrupt: the run ends here
        return [{"epoch": 2, "test_error": 0.5}]  # the run went on: exit status 0

    monkeypatch.setattr(trainer, "train", swallowing_train)
    status, _, err = run(capsys, "train", "--out", str(tmp_path / "run"), *FAST)
    assert status == 130 and "interrupted" in err
