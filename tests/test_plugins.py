"""A network of a user's own, written as Φ in a file outside the package, used like a built-in one:
trained from the command line with --set overrides, resumed exactly (in a fresh process), evaluated
and GDU-checked; and its EP estimates approach BPTT's gradient as β → 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from eqprop import ConfigError, Phases, build_estimator, validate_config
from eqprop.cli import main
from eqprop.plugins import load_plugins
from eqprop.training.checkpoint import load_checkpoint

PLUGIN = Path(__file__).parent / "plugins" / "lateral_mlp.py"


def write_config(folder: Path, **changes: object) -> Path:
    config = {"name": "lateral", "plugins": [str(PLUGIN)],
              "model": {"kind": "lateral_mlp", "hidden": 16},
              "data": {"dataset": "mnist-demo", "train_subset": 300, "test_subset": 100},
              "dynamics": {"t1": 12, "t2": 4, "beta": 0.2},
              "estimator": {"name": "symmetric"},
              "optim": {"name": "sgd", "lr": 0.05},
              # threads pinned: two fresh runs are compared bit for bit
              "train": {"epochs": 2, "batch_size": 50, "stop_at_chance": None, "threads": 1}, **changes}
    path = folder / "lateral.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def model_state(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoint.pt")["model"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_plugin_model_trains_from_the_command_line_and_resumes_exactly(tmp_path):
    config = write_config(tmp_path)
    overrides = ["--set", "model.hidden=20", "--set", "optim.lr=0.1", "--no-progress"]
    assert main(["train", "--config", str(config), *overrides, "--out", str(tmp_path / "whole")]) == 0
    assert main(["train", "--config", str(config), *overrides, "--epochs", "1", "--out", str(tmp_path / "part")]) == 0
    stored = yaml.safe_load((tmp_path / "whole" / "config.yaml").read_text())
    assert stored["plugins"] == [str(PLUGIN)] and stored["model"]["hidden"] == 20 and stored["optim"]["lr"] == 0.1
    assert model_state(tmp_path / "whole")["w1.weight"].shape == (20, 784)

    # the second epoch in a fresh process: it finds the plugin from the run's own configuration
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                                    os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "eqprop", "train", "--resume", str(tmp_path / "part"),
                           "--epochs", "2", "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    whole, resumed = model_state(tmp_path / "whole"), model_state(tmp_path / "part")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    assert [m["test_error"] for m in metrics(tmp_path / "whole")] == [m["test_error"] for m in metrics(tmp_path / "part")]
    assert metrics(tmp_path / "whole")[-1]["test_error"] < 0.9  # it learns: 10 classes, chance is 0.9


def test_plugin_model_is_evaluated_and_gdu_checked(tmp_path, capsys):
    config = write_config(tmp_path, train={"epochs": 1, "batch_size": 50, "stop_at_chance": None})
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run), "--no-progress"]) == 0
    assert main(["eval", "--checkpoint", str(run)]) == 0
    assert "test error" in capsys.readouterr().out
    assert main(["gdu", "--checkpoint", str(run), "--batch-size", "4", "--t1", "40", "--k", "6",
                 "--estimators", "symmetric,one_sided", "--out", str(tmp_path / "gdu")]) == 0
    result = json.loads((tmp_path / "gdu" / "gdu.json").read_text())
    assert set(result["estimators"]) == {"symmetric", "one_sided"}
    assert result["estimators"]["symmetric"]["angle_deg"] < 10.0


def test_plugin_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="plugins: no plugin file") as absent:
        validate_config({"plugins": [str(tmp_path / "missing.py")]})
    assert "current folder" not in str(absent.value)
    with pytest.raises(ConfigError, match=r"no plugin file missing.py \(relative paths are read from the current "
                                          r"folder, /"):
        validate_config({"plugins": ["missing.py"]})
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="plugins: plugin file .*broken.py failed: RuntimeError: boom"):
        validate_config({"plugins": [str(broken)]})
    load_plugins([str(PLUGIN)])
    with pytest.raises(ConfigError, match="model.hidden: Input should be greater than 0"):
        validate_config({"plugins": [str(PLUGIN)], "model": {"kind": "lateral_mlp", "hidden": 0}})
    with pytest.raises(ConfigError, match="model.depth: unknown key"):
        validate_config({"plugins": [str(PLUGIN)], "model": {"kind": "lateral_mlp", "depth": 3}})
    with pytest.raises(ConfigError, match="model.kind: unknown model kind 'hopfield'; choose one of .*lateral_mlp"):
        validate_config({"model": {"kind": "hopfield"}})


def test_plugin_model_that_does_not_fit_the_data_is_refused_in_one_line(tmp_path, capsys):
    config = write_config(tmp_path, model={"kind": "lateral_mlp", "inputs": 100})
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model: the lateral_mlp model cannot take mnist-demo samples of shape [784]" in err
    assert len(err.splitlines()) == 1


def lateral_model(activation: str = "scaled_sigmoid"):
    load_plugins([str(PLUGIN)])
    section = validate_config({"plugins": [str(PLUGIN)],
                               "model": {"kind": "lateral_mlp", "inputs": 12, "hidden": 9, "classes": 4,
                                         "activation": activation, "lateral_scale": 0.1}}).model
    plugin = sys.modules[next(name for name in sys.modules if name.startswith("eqprop_plugin_lateral_mlp"))]
    g = torch.Generator().manual_seed(3)
    model = plugin.LateralMLP(section, g).double()
    x = torch.rand(6, 12, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (6,), generator=g)
    return model, x, labels


def flat(estimator, model, x, target) -> torch.Tensor:
    return torch.cat([d.flatten() for d in estimator.estimate(model, x, target).direction])


def test_symmetric_ep_on_a_phi_model_approaches_bptt_as_beta_shrinks():
    model, x, labels = lateral_model()
    target = F.one_hot(labels, 4).double()
    bptt = flat(build_estimator("bptt", Phases(150, 150, 0.1), bptt_steps="all"), model, x, target)
    errors = {}
    for beta in (0.2, 0.02, 0.002):
        phases = Phases(150, 150, beta)
        errors[beta] = {name: float((flat(build_estimator(name, phases), model, x, target) - bptt).norm() / bptt.norm())
                        for name in ("one_sided", "symmetric")}
        assert errors[beta]["symmetric"] < errors[beta]["one_sided"], errors
    # bias O(β) for one-sided, O(β²) for symmetric: a 10x smaller β shrinks them ~10x and ~100x
    assert 5 < errors[0.02]["one_sided"] / errors[0.002]["one_sided"] < 20, errors
    assert errors[0.02]["symmetric"] / errors[0.002]["symmetric"] > 50, errors
    assert errors[0.002]["symmetric"] < 1e-4, errors


def test_integer_labels_give_the_one_hot_estimate():
    model, x, labels = lateral_model()
    phases = Phases(20, 6, 0.1)
    for name in ("symmetric", "one_sided", "bptt"):
        one_hot = flat(build_estimator(name, phases), model, x, F.one_hot(labels, 4).double())
        assert torch.equal(flat(build_estimator(name, phases), model, x, labels), one_hot), name
    with pytest.raises(ValueError, match=r"targets: labels must lie in \[0, 4\), got 0..7"):
        build_estimator("symmetric", phases).estimate(model, x, torch.tensor([0, 1, 2, 3, 7, 1]))


ESTIMATOR_PLUGIN = Path(__file__).parent / "plugins" / "scaled_estimator.py"


def test_a_plugin_estimator_takes_its_own_options(tmp_path, capsys):
    config = write_config(tmp_path, plugins=[str(PLUGIN), str(ESTIMATOR_PLUGIN)],
                          estimator={"name": "scaled_symmetric"},
                          train={"epochs": 1, "batch_size": 50, "stop_at_chance": None, "threads": 1})
    assert main(["train", "--config", str(config), "--set", "estimator.options.scale=0.5", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["estimator"]["options"] == {"scale": 0.5}
    for setting, message in (("estimator.options.scale=0", "estimator.options.scale: Input should be greater than 0"),
                             ("estimator.options.shift=1", "estimator.options.shift: unknown key")):
        assert main(["train", "--config", str(config), "--set", setting, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err


def test_a_plugin_estimators_options_change_its_estimate():
    load_plugins([str(ESTIMATOR_PLUGIN)])
    from eqprop.build import build_estimator_from
    model, x, labels = lateral_model()
    estimates = []
    for scale in (1.0, 0.25):
        config = validate_config({"plugins": [str(ESTIMATOR_PLUGIN)], "dynamics": {"t1": 20, "t2": 5},
                                  "estimator": {"name": "scaled_symmetric", "options": {"scale": scale}}})
        estimates.append(flat(build_estimator_from(config, torch.Generator()), model, x, labels))
    torch.testing.assert_close(estimates[1], 0.25 * estimates[0])
