"""``auto`` CPU settings: the timing rule, what a run writes down, and the kernel's threads."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
import yaml

from eqprop import validate_config
from eqprop import build
from eqprop.build import resolve_cpu_settings
from eqprop.cpu_choice import MARGIN, TIMED_BATCH, CpuSetting, choose, settings
from eqprop.cpu_kernels.runner import available_cores, idle_cores
from eqprop.presets import load_preset
from eqprop.training.checkpoint import load_checkpoint
from eqprop.training.trainer import train

KERNEL, PYTORCH = CpuSetting(True, 1), CpuSetting(False, 2)


def sleeper(seconds: dict[CpuSetting, float]):
    return lambda setting: (lambda: time.sleep(seconds[setting]))


def test_the_kernel_is_kept_unless_pytorch_is_clearly_faster():
    assert choose([KERNEL, PYTORCH], sleeper({KERNEL: 0.010, PYTORCH: 0.0095}))[0] == KERNEL   # within the margin
    best, medians = choose([KERNEL, PYTORCH], sleeper({KERNEL: 0.010, PYTORCH: 0.005}))
    assert best == PYTORCH and medians[PYTORCH] < medians[KERNEL] / (1 + MARGIN)
    assert choose([KERNEL, PYTORCH], sleeper({KERNEL: 0.005, PYTORCH: 0.010}))[0] == KERNEL


def test_what_auto_chooses_among():
    mlp = validate_config(load_preset("laborieux-mnist"))
    assert settings(mlp, 4, kernel_runs_model=True) == [CpuSetting(True, 1), CpuSetting(False, 4)]
    assert settings(mlp, 4, kernel_runs_model=False) == [CpuSetting(False, 4)]
    pinned = validate_config({**load_preset("laborieux-mnist"), "train": {"cpu_kernels": False, "threads": 3}})
    assert settings(pinned, 4, kernel_runs_model=True) == [CpuSetting(False, 3)]


def test_a_convnet_gets_pytorch_on_the_idle_cores_without_timing():
    config, notes = resolve_cpu_settings(validate_config(load_preset("cifar10-small")), torch.device("cpu"))
    assert config.train.cpu_kernels is False and 1 <= config.train.threads <= available_cores() and notes == []


def test_a_full_batch_run_is_timed_on_a_bounded_batch(monkeypatch):
    """The timed step of a 60,000-sample batch takes TIMED_BATCH random samples, not the batch: a
    full-batch run would otherwise spend a dozen epochs' time choosing."""
    batches = []

    class Recorder:
        def estimate(self, model, x, target):
            batches.append(len(x))

    monkeypatch.setattr(build, "build_estimator_from", lambda *args: Recorder())
    monkeypatch.setattr(build.cpu_choice, "choose",
                        lambda options, time_step: ([time_step(s)() for s in options] and options[0], {}))
    for batch_size in (60000, 20):
        data = load_preset("laborieux-mnist")
        data["train"].update(batch_size=batch_size, cpu_kernels="auto", threads="auto")
        resolve_cpu_settings(validate_config(data), torch.device("cpu"))
    assert batches and set(batches[:len(batches) // 2]) == {TIMED_BATCH} and set(batches[len(batches) // 2:]) == {20}


def test_a_run_writes_down_its_choice_and_resumes_with_it(tmp_path):
    data = load_preset("laborieux-mnist")
    data["data"] = {"dataset": "mnist-demo", "train_subset": 200, "test_subset": 100}
    data["train"].update(epochs=1, stop_at_chance=None)
    notes: list[str] = []
    train(validate_config(data), tmp_path, log=notes.append)
    assert any(note.startswith("CPU setting (train.cpu_kernels auto)") for note in notes), notes
    stored = yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]
    assert isinstance(stored["cpu_kernels"], bool) and isinstance(stored["threads"], int)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["config"]["train"]["cpu_kernels"] == stored["cpu_kernels"]
    resumed: list[str] = []
    train(validate_config({**yaml.safe_load((tmp_path / "config.yaml").read_text()),
                           "train": {**stored, "epochs": 2}}), tmp_path, resume=True, log=resumed.append)
    assert not any(note.startswith("CPU setting") for note in resumed)  # nothing left to choose


def test_the_kernels_thread_count_does_not_change_results(tmp_path):
    data = load_preset("laborieux-mnist")
    data["data"] = {"dataset": "mnist-demo", "train_subset": 200, "test_subset": 100}
    runs = []
    for threads in (1, 3):
        data["train"].update(epochs=1, cpu_kernels=True, threads=1, cpu_kernel_threads=threads)
        train(validate_config(data), tmp_path / str(threads), log=lambda _: None)
        runs.append(load_checkpoint(tmp_path / str(threads) / "checkpoint.pt")["model"])
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


@pytest.mark.skipif(available_cores() < 2, reason="needs two cores to leave one idle")
def test_idle_cores_sees_another_busy_process():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert idle_cores(window=0.3) <= available_cores() - 1
    finally:
        busy.kill()
        busy.wait()
