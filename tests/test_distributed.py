"""Data-parallel training with torch.distributed (gloo, 2 processes on loopback): the same weights as
one process with the same global batch and seed, exact resumption (also after a kill, and on another
number of processes), and a missing peer that ends the run in one line within the timeout."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from eqprop.training.checkpoint import load_checkpoint
from eqprop.training.metrics import read_metrics

SRC = str(Path(__file__).parents[1] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))
    return env | extra


def write_config(folder: Path, estimator: str, epochs: int = 2, train_subset: int = 200, **train: object) -> Path:
    config = {"name": f"dist-{estimator}",
              "model": {"kind": "mlp", "sizes": [784, 24, 10], "activation": "scaled_sigmoid", "loss": "mse"},
              "data": {"dataset": "mnist-demo", "train_subset": train_subset, "test_subset": 100},
              "dynamics": {"t1": 10, "t2": 4, "beta": 0.2},
              "estimator": {"name": estimator},
              "optim": {"name": "sgd", "lr": [0.05, 0.02], "momentum": 0.5},
              "train": {"epochs": epochs, "batch_size": 20, "stop_at_chance": None, "dtype": "float64",
                        "cpu_kernels": True, "threads": 1, "dist_timeout": 60, **train}}
    path = folder / f"{estimator}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def eqprop(*args: str, processes: int = 1, wait: bool = True, **env: str) -> subprocess.CompletedProcess | subprocess.Popen:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                 "--master-port", str(free_port()), "-m", "eqprop"] if processes > 1
                else [sys.executable, "-m", "eqprop"])
    command = [*launcher, *args, "--no-progress"]
    if not wait:
        return subprocess.Popen(command, env=environment(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    done = subprocess.run(command, env=environment(**env), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoint.pt")["model"]


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("estimator", ["symmetric", "bptt"])
def test_two_processes_train_like_one(tmp_path, estimator):
    config = write_config(tmp_path, estimator)
    eqprop("train", "--config", str(config), "--out", str(tmp_path / "one"))
    done = eqprop("train", "--config", str(config), "--out", str(tmp_path / "two"), processes=2)
    assert "distributed: 2 processes, 10 samples each of every batch of 20" in done.stdout
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-12)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    for a, b in zip(one, two):  # evaluation and training statistics are reduced over the processes
        assert a["test_error"] == b["test_error"] and a["train_error"] == b["train_error"]
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-12
    info = __import__("json").loads((tmp_path / "two" / "run.json").read_text())["sessions"][0]
    assert info["world_size"] == 2


def test_every_process_stops_after_the_same_epoch_at_the_time_limit(tmp_path):
    config = write_config(tmp_path, "symmetric", epochs=3)
    done = eqprop("train", "--config", str(config), "--out", str(tmp_path / "cut"), "--time-limit", "0.01s",
                  processes=2)
    assert "stopped at the time limit after epoch 1 of 3" in done.stdout   # rank 0's clock decided for both
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 1
    eqprop("train", "--resume", str(tmp_path / "cut"), processes=2)
    eqprop("train", "--config", str(config), "--out", str(tmp_path / "whole"), processes=2)
    assert_same_weights(tmp_path / "whole", tmp_path / "cut", atol=0.0)


def test_a_killed_distributed_run_resumes_like_one_never_stopped(tmp_path):
    config = write_config(tmp_path, "symmetric", epochs=4, train_subset=1000)
    eqprop("train", "--config", str(config), "--out", str(tmp_path / "whole"), processes=2)
    runner = eqprop("train", "--config", str(config), "--out", str(tmp_path / "cut"), processes=2, wait=False)
    deadline = time.time() + 120
    while not (tmp_path / "cut" / "checkpoint.pt").exists() and runner.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(runner.pid, signal.SIGTERM)  # torchrun and its workers
    runner.communicate(timeout=120)
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"]
    assert saved >= 1
    eqprop("train", "--resume", str(tmp_path / "cut"), processes=2)
    assert_same_weights(tmp_path / "whole", tmp_path / "cut", atol=0.0)
    assert [r["epoch"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_distributed_run_resumes_on_another_number_of_processes(tmp_path):
    config = write_config(tmp_path, "symmetric", epochs=2)
    eqprop("train", "--config", str(config), "--out", str(tmp_path / "whole"))
    eqprop("train", "--config", str(config), "--epochs", "1", "--out", str(tmp_path / "moved"), processes=2)
    eqprop("train", "--resume", str(tmp_path / "moved"), "--epochs", "2")   # one process now: the same data order
    assert_same_weights(tmp_path / "whole", tmp_path / "moved", atol=1e-12)


def test_a_missing_peer_ends_the_run_in_one_line_within_the_timeout(tmp_path):
    config = write_config(tmp_path, "symmetric", dist_timeout=3)
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "eqprop", "train", "--config", str(config), "--out",
                           str(tmp_path / "alone"), "--no-progress"], capture_output=True, text=True, timeout=120,
                          env=environment(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                          MASTER_PORT=str(free_port())))
    assert done.returncode == 1
    assert time.time() - start < 60
    lines = done.stderr.strip().splitlines()
    assert "could not reach its peers within 3 s (train.dist_timeout)" in lines[-1], done.stderr


def test_what_a_distributed_run_cannot_do_is_refused_in_one_line(tmp_path):
    odd = write_config(tmp_path, "symmetric", batch_size=15)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), "-m", "eqprop", "train", "--config", str(odd), "--out",
                           str(tmp_path / "odd"), "--no-progress"], capture_output=True, text=True, timeout=300,
                          env=environment())
    assert done.returncode != 0
    assert "train.batch_size: the global batch of 15 does not split evenly across 2 processes" in done.stderr


def test_a_configuration_with_resume_starts_the_run_once_then_continues_it(tmp_path):
    """What torchrun's elastic restarts need: one command that starts a run and later continues it."""
    config = write_config(tmp_path, "symmetric", epochs=1)
    first = eqprop("train", "--config", str(config), "--resume", str(tmp_path / "run"))
    assert "epoch 1/1" in first.stdout
    again = eqprop("train", "--config", str(config), "--resume", str(tmp_path / "run"), "--epochs", "2")
    assert "resuming" in again.stdout and "epoch 2/2" in again.stdout
