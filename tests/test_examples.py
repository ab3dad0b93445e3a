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
