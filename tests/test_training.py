"""Training runs end to end: learning, exact resume, divergence, checkpoints, outputs."""
from __future__ import annotations

import json

import pytest
import torch

from eqprop.estimators import SymmetricEP
from eqprop.config import ConfigError, validate_config
from eqprop.presets import load_preset
from eqprop.training import CheckpointError, DivergenceError, load_checkpoint, train
from eqprop.training.callbacks import Callback
from eqprop.training.trainer import BEST_CHECKPOINT, CHECKPOINT


def small_config(**changes):
    data = load_preset("demo")
    data["data"].update(train_subset=400, test_subset=200)
    # these tests compare runs bit for bit: they pin what runs the phases (auto is tested on its own)
    data["train"].update(epochs=2, batch_size=20, threads=1, cpu_kernels=True)
    data["dynamics"].update(t1=12, t2=4)
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    return validate_config(data)


def quiet(_message: str) -> None:
    pass


def test_short_run_lowers_loss_and_writes_outputs(tmp_path):
    config = small_config(train={"epochs": 3})
    records = train(config, tmp_path, log=quiet)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["train_loss"] < 0.8 * records[0]["train_loss"]
    assert records[-1]["test_error"] < 0.5  # chance is 0.9
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == records
    for key in ("epoch", "train_loss", "train_error", "test_error", "epoch_seconds", "samples_per_second"):
        assert key in lines[0]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert validate_config(__import__("yaml").safe_load((tmp_path / "config.yaml").read_text())) == config
    assert load_checkpoint(tmp_path / CHECKPOINT)["epoch"] == 3
    errors = [r["test_error"] for r in records]
    assert load_checkpoint(tmp_path / BEST_CHECKPOINT)["epoch"] == 1 + errors.index(min(errors))


@pytest.mark.parametrize("estimator", ["random_sign", "symmetric"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, estimator):
    config = small_config(estimator={"name": estimator}, optim={"name": "sgd", "lr": [0.05, 0.02], "momentum": 0.9},
                          schedule={"name": "cosine", "t_max": 3, "eta_min": 1e-3}, train={"epochs": 3})
    assert_resumed_run_equals_uninterrupted_run(config, tmp_path)


@pytest.mark.parametrize("estimator", ["c_ep", "c_vf"])
def test_a_resumed_continual_run_equals_an_uninterrupted_one(tmp_path, estimator):
    """The continual estimators move the weights inside the phase and draw β's sign (C-VF) from
    their own generator, with samples left out (settle_tol) and weight decay: a resumed run
    still retraces the uninterrupted one."""
    model = {"backward": "separate", "backward_init": "flipped", "nudge": "outside"} if estimator == "c_vf" else {}
    config = small_config(model=model, estimator={"name": estimator, "random_sign": estimator == "c_vf",
                                                  "options": {"settle_tol": 1e-6}},
                          optim={"name": "sgd", "lr": [0.05, 0.02], "weight_decay": 1e-3},
                          train={"epochs": 3})
    records = assert_resumed_run_equals_uninterrupted_run(config, tmp_path)
    assert all(0 < r["nudged_excluded"] < 400 for r in records)   # some samples left out, not all


def assert_resumed_run_equals_uninterrupted_run(config, tmp_path):
    """``config`` trained straight, and stopped after epoch 1 then resumed: the same weights and
    the same metrics (but the timings). Returns the uninterrupted run's records."""
    full = train(config, tmp_path / "full", log=quiet)
    first = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 1})})
    train(first, tmp_path / "split", log=quiet)
    resumed = train(config, tmp_path / "split", resume=True, log=quiet)
    a = load_checkpoint(tmp_path / "full" / CHECKPOINT)
    b = load_checkpoint(tmp_path / "split" / CHECKPOINT)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    strip = lambda records: [{k: v for k, v in r.items() if k not in ("epoch_seconds", "samples_per_second")}
                             for r in records]
    assert strip(resumed) == strip(full)
    return full


def test_resume_drops_metrics_of_an_epoch_without_checkpoint(tmp_path):
    config = small_config(train={"epochs": 1})
    train(config, tmp_path, log=quiet)
    with (tmp_path / "metrics.jsonl").open("a") as handle:  # a crash after the metrics line of epoch 2
        handle.write(json.dumps({"epoch": 2, "train_loss": 0.0}) + "\n{\"epoch\": 3, \"tr")
    two = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 2})})
    records = train(two, tmp_path, resume=True, log=quiet)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["train_loss"] > 0


def test_extended_cosine_run_keeps_its_schedule(tmp_path):
    config = small_config(schedule={"name": "cosine", "eta_min": 1e-4}, train={"epochs": 2})
    train(config, tmp_path, log=quiet)
    stored = load_checkpoint(tmp_path / CHECKPOINT)["config"]
    assert stored["schedule"]["t_max"] == 2
    longer = validate_config(stored)
    longer = longer.model_copy(update={"train": longer.train.model_copy(update={"epochs": 3})})
    records = train(longer, tmp_path, resume=True, log=quiet)
    assert records[-1]["lr"] == pytest.approx([1e-4, 1e-4])  # annealed over 2 epochs, then constant


def test_resume_refuses_changed_learning_rates(tmp_path):
    train(small_config(train={"epochs": 1}), tmp_path, log=quiet)
    with pytest.raises(CheckpointError, match="optim.lr"):
        train(small_config(optim={"lr": [0.5, 0.5]}), tmp_path, resume=True, log=quiet)


def test_new_run_refuses_to_overwrite_a_run(tmp_path):
    config = small_config(train={"epochs": 1})
    train(config, tmp_path, log=quiet)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config, tmp_path, log=quiet)


def test_new_run_refuses_a_folder_of_other_files_and_leaves_them_untouched(tmp_path):
    own = tmp_path / "config.yaml"
    own.write_text("# my notes\nmodel: {}\n")
    with pytest.raises(ConfigError, match="holds no eqprop run"):
        train(small_config(train={"epochs": 1}), tmp_path, log=quiet)
    assert own.read_text() == "# my notes\nmodel: {}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # not even a lock file
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        train(small_config(train={"epochs": 1}), a_file, log=quiet)


def test_a_run_stopped_before_its_first_epoch_starts_again_in_its_folder(tmp_path):
    class StopAtFirstBatch(Callback):
        def on_batch(self, epoch, batch, estimate):
            raise KeyboardInterrupt

    config = small_config(train={"epochs": 1})
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path, log=quiet, callbacks=[StopAtFirstBatch()])
    assert (tmp_path / "run.json").exists() and not (tmp_path / CHECKPOINT).exists()
    assert len(train(config, tmp_path, log=quiet)) == 1


def test_a_run_moved_away_from_its_data_root_resumes_from_the_default_root(tmp_path, data_root, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mnist").symlink_to(data_root / "mnist")
    monkeypatch.chdir(tmp_path)
    config = small_config(data={"dataset": "mnist", "train_subset": 200, "test_subset": 100}, train={"epochs": 1})
    train(config, "run", data_dir="data", log=quiet)
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["data_dir"] == str(tmp_path / "data")  # absolute
    (tmp_path / "data" / "mnist").unlink()       # the run carried to a machine whose data lives elsewhere
    (tmp_path / "data").rmdir()
    monkeypatch.setenv("EQPROP_DATA", str(data_root))
    said = []
    longer = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 2})})
    records = train(longer, "run", resume=True, log=said.append)
    assert len(records) == 2
    assert any(f"data root {tmp_path / 'data'} is not here: reading the data from {data_root}" in line
               for line in said)


def test_resume_survives_binary_garbage_in_the_metrics_and_config_files(tmp_path):
    config = small_config(train={"epochs": 1})
    train(config, tmp_path, log=quiet)
    (tmp_path / "metrics.jsonl").write_bytes(b"\xff\xfe\x00{garbage")
    (tmp_path / "config.yaml").write_bytes(b"\xff\xfe\x00: [")
    longer = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 2})})
    records = train(longer, tmp_path, resume=True, log=quiet)
    assert [r["epoch"] for r in records] == [2]  # the unreadable epoch is gone, the checkpoint carried on


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    train(small_config(train={"epochs": 1}), tmp_path, log=quiet)
    other = small_config(model={"sizes": [784, 64, 10]})
    with pytest.raises(CheckpointError, match="other model settings"):
        train(other, tmp_path, resume=True, log=quiet)


def test_resume_refuses_another_optimizer(tmp_path):
    train(small_config(train={"epochs": 1}), tmp_path, log=quiet)
    with pytest.raises(CheckpointError, match="optim.name"):
        train(small_config(optim={"name": "sgd", "lr": [0.1, 0.1]}), tmp_path, resume=True, log=quiet)


def test_corrupt_checkpoint_is_refused(tmp_path):
    train(small_config(train={"epochs": 1}), tmp_path, log=quiet)
    path = tmp_path / CHECKPOINT
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    config = small_config(train={"epochs": 3})
    original = SymmetricEP.estimate
    calls = []

    def poisoned(self, model, x, target):  # a NaN estimate in the second epoch
        result = original(self, model, x, target)
        calls.append(1)
        if len(calls) == 25:  # the weights take the NaN, then the next batch's states
            result.direction[0][0, 0] = float("nan")
        return result

    monkeypatch.setattr(SymmetricEP, "estimate", poisoned)
    with pytest.raises(DivergenceError, match="diverged in epoch 2"):
        train(config, tmp_path, log=quiet)
    assert load_checkpoint(tmp_path / CHECKPOINT)["epoch"] == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_wrong_number_of_learning_rates_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="optim.lr"):
        train(small_config(optim={"lr": [0.1, 0.1, 0.1]}), tmp_path, log=quiet)


def test_model_that_does_not_fit_the_data_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.sizes"):
        train(small_config(model={"sizes": [100, 32, 10]}), tmp_path, log=quiet)


def test_bf16_autocast_run_learns(tmp_path):
    records = train(small_config(train={"epochs": 2, "bf16_autocast": True}), tmp_path / "bf16", log=quiet)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["test_error"] < 0.6
    full = train(small_config(train={"epochs": 2}), tmp_path / "float32", log=quiet)
    assert records[-1]["train_loss"] != full[-1]["train_loss"]   # the phases did run in bfloat16


def test_gradient_angle_is_logged_every_n_batches(tmp_path):
    records = train(small_config(train={"epochs": 1, "angle_every": 7}), tmp_path, log=quiet)
    angles = records[0]["gradient_angles"]
    assert [batch for batch, _ in angles] == [1, 8, 15]
    assert all(0.0 < angle < 5.0 for _, angle in angles)   # symmetric EP, β 0.1: 0.5-1° measured


@pytest.mark.parametrize("setting, expected", [("auto", torch.channels_last), (True, torch.channels_last),
                                               (False, torch.contiguous_format)])
def test_conv_models_are_placed_channels_last_on_the_cpu_by_default(setting, expected):
    from eqprop import build
    data = load_preset("cifar10-small")
    data["train"]["channels_last"] = setting
    config = validate_config(data)
    model = build.place_model(build.build_model(config), config, torch.device("cpu"))
    assert model.memory_format() == expected


def test_backend_follows_device_and_settings():
    from eqprop.backends import Backend, CpuKernelBackend, CudaGraphsBackend
    from eqprop.build import build_backend
    from eqprop.cuda_graphs import PhaseGraphs
    from eqprop.dynamics import run_phase
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    graphs = build_backend(small_config(), cuda)   # constructing needs no GPU
    assert isinstance(graphs, CudaGraphsBackend) and isinstance(graphs.runner("synchronous"), PhaseGraphs)
    assert type(build_backend(small_config(train={"cuda_graphs": False}), cuda)) is Backend
    assert type(build_backend(small_config(train={"compile": True}), cuda)) is Backend
    kernel = build_backend(small_config(train={"cpu_kernel_threads": 3}), cpu)
    assert isinstance(kernel, CpuKernelBackend) and kernel.phases.threads == 3
    assert type(build_backend(small_config(train={"cpu_kernels": False}), cpu)) is Backend
    assert build_backend(small_config(train={"compile": True}), cpu).runner("synchronous") is run_phase


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_kernel_run_follows_the_pytorch_run(tmp_path, monkeypatch, loss):
    """The C kernel's training run stays on the PyTorch run's path (float64: rounding only)."""
    from conftest import require_c_compiler
    from eqprop.cpu_kernels import KernelPhases
    require_c_compiler()
    phases, by_kernel = [], []
    call, run = KernelPhases.run_until, KernelPhases._run

    def counted_call(self, *args, **kwargs):
        phases.append(1)
        return call(self, *args, **kwargs)

    def counted_run(self, *args):
        result = run(self, *args)
        by_kernel.append(result is not None)
        return result
    monkeypatch.setattr(KernelPhases, "run_until", counted_call)
    monkeypatch.setattr(KernelPhases, "_run", counted_run)
    runs = [train(small_config(model={"loss": loss}, train={"dtype": "float64", "cpu_kernels": on, "device": "cpu"}),
                  tmp_path / str(on), log=quiet)
            for on in (True, False)]
    assert phases and len(by_kernel) == len(phases) and all(by_kernel)  # every phase ran in the kernel
    for kernel, eager in zip(*runs):
        assert kernel["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-9)
        assert kernel["test_loss"] == pytest.approx(eager["test_loss"], rel=1e-9)
        assert kernel["test_error"] == eager["test_error"]


def test_a_collapse_to_chance_is_reported_with_the_best_epoch():
    from eqprop.training.trainer import collapse_warning
    records = [{"epoch": e, "test_error": err} for e, err in enumerate([0.3, 0.05, 0.04, 0.06], start=1)]
    assert collapse_warning(records) is None                  # noise around a good error
    assert collapse_warning(records[:1]) is None
    collapsed = records + [{"epoch": 5, "test_error": 0.902}]
    message = collapse_warning(collapsed)
    assert message is not None and "epoch 3" in message and "90.20%" in message
    early = [{"epoch": 1, "test_error": 0.7}, {"epoch": 2, "test_error": 0.8}]
    assert collapse_warning(early) is None                    # not twice the best


def test_a_checkpoint_of_an_older_release_resumes(tmp_path):
    """Fields added since a checkpoint was written take their defaults; resume must not call
    them changed settings."""
    from eqprop.training.checkpoint import save_checkpoint
    config = small_config(train={"epochs": 1})
    train(config, tmp_path, log=quiet)
    payload = load_checkpoint(tmp_path / CHECKPOINT)
    for section, key in (("model", "backward"), ("model", "backward_init"), ("optim", "fused"),
                         ("train", "cuda_graphs")):
        del payload["config"][section][key]
    payload = {k: v for k, v in payload.items() if k not in ("format", "version")}
    save_checkpoint(tmp_path / CHECKPOINT, payload)
    two = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 2})})
    assert [r["epoch"] for r in train(two, tmp_path, resume=True, log=quiet)] == [1, 2]


def test_estimators_that_move_the_weights_do_not_trip_the_scheduler_warning(tmp_path):
    import warnings
    config = small_config(estimator={"name": "c_ep"}, optim={"name": "sgd", "lr": [0.01, 0.005]},
                          train={"epochs": 2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config, tmp_path, log=quiet)
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_frozen_parameters_keep_their_initial_values(tmp_path, cpu_kernels):
    from eqprop import build
    frozen = ["layers.0.bias", "layers.1.weight"]
    config = small_config(optim={"frozen": frozen}, train={"epochs": 1, "cpu_kernels": cpu_kernels})
    initial = build.build_run(config).model.state_dict()
    train(config, tmp_path, log=quiet)
    trained = load_checkpoint(tmp_path / CHECKPOINT)["model"]
    for name, value in initial.items():
        assert torch.equal(trained[name], value) == (name in frozen), name


def test_an_unknown_frozen_parameter_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.frozen: the model has no trainable parameter 'layers.9.bias'; "
                                          r"it has layers.0.weight, layers.0.bias"):
        train(small_config(optim={"frozen": ["layers.9.bias"]}), tmp_path, log=quiet)
