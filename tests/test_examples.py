"""The examples run as a user would run them (on tiny settings: ``--quick``)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def run(*command: str, cwd: Path = ROOT) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.parametrize("script, expected", [
    ("train_with_dataloader.py", "epoch 1: train error"),
    ("lateral_phi.py", "epoch 1/1"),
    ("custom_estimator.py", "one epoch with two_sided_mean"),
    ("hopfield_resnet.py", "epoch 1/1"),
])
def test_example_runs(script, expected):
    assert expected in run(sys.executable, f"examples/{script}", "--quick")


def test_gdu_example_agrees_with_bptt(tmp_path):
    out = run(sys.executable, "examples/gdu_custom_model.py", "--quick", "--out", str(tmp_path))
    angle = float(out.split("symmetric")[1].split("angle to BPTT")[1].split()[0])
    assert angle < 1.0, out
    assert (tmp_path / "gdu.json").exists()


def test_example_config_trains_from_the_command_line(tmp_path):
    out = run(sys.executable, "-m", "eqprop", "train", "--config", "examples/lateral.yaml", "--set", "model.hidden=16",
              "--epochs", "1", "--train-subset", "100", "--test-subset", "100", "--no-progress",
              "--out", str(tmp_path / "run"))
    assert "done: test error" in out
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def test_the_residual_hopfield_plugin_trains_resumes_and_runs_the_gdu_check(tmp_path):
    tiny = ["--config", "examples/hopfield_resnet.yaml", "--set", "data.dataset=mnist-demo", "--set",
            "model.channels=2", "--set", "model.blocks=2", "--set", "model.features=8", "--set", "dynamics.t1=6",
            "--set", "dynamics.t2=3", "--train-subset", "64", "--test-subset", "32", "--no-progress"]
    folder = str(tmp_path / "run")
    assert "epoch 1/1" in run(sys.executable, "-m", "eqprop", "train", *tiny, "--epochs", "1", "--out", folder)
    resumed = run(sys.executable, "-m", "eqprop", "train", "--resume", folder, "--epochs", "2", "--no-progress")
    assert "resuming" in resumed and "epoch 2/2" in resumed
    out = run(sys.executable, "-m", "eqprop", "gdu", "--checkpoint", folder, "--batch-size", "2", "--k", "3",
              "--out", str(tmp_path / "gdu"))
    assert "symmetric" in out and (tmp_path / "gdu" / "gdu.json").exists()
