"""The C-VF evidence scripts: the feedback of continual updates, the angle experiment's table, the
free-phase cycles and their push, and the harness of the authors' code."""
from __future__ import annotations

import json

import pytest

from eqprop.presets import load_preset
from eqprop.config import validate_config
from eqprop.training import train

from test_reproduction_table import load_script
from test_training import quiet


def tiny_cvf(tmp_path, lr):
    data = load_preset("cvf-1h")
    data["model"]["sizes"] = [784, 32, 10]
    data["data"] = {"dataset": "mnist-demo", "train_subset": 100, "test_subset": 50}
    data["dynamics"].update(t1=10, t2=5)
    data["optim"]["lr"] = [lr, lr / 2]
    data["train"].update(epochs=1, threads=1, stop_at_chance=None)
    train(validate_config(data), tmp_path, log=quiet)
    return tmp_path


def test_the_feedback_of_continual_updates_grows_with_the_learning_rate(tmp_path):
    feedback = load_script("continual_feedback")
    folder = tiny_cvf(tmp_path, 0.01)
    results = feedback.measure(folder, None, batches=3, factors=[0.01, 1.0, 30.0])
    for sign in ("+β", "-β"):
        gaps = results["gaps"][sign]
        assert gaps["0.01"]["max"] < 0.05                         # η → 0: the frozen-weight estimate
        assert gaps["0.01"]["median"] < gaps["1.0"]["median"] < gaps["30.0"]["median"]


def test_the_angle_table_lists_every_recorded_angle_in_order(tmp_path, monkeypatch):
    angles = load_script("cvf_angles")
    monkeypatch.setattr(angles, "ROOT", tmp_path)
    for angle, errors in ((85.0, [0.5, 0.4]), (0.0, [0.1, 0.05, 0.07])):
        folder = angles.folder(angle)
        folder.mkdir()
        lines = [json.dumps({"epoch": e + 1, "test_error": err, "angle/layer2": angle / (e + 1)})
                 for e, err in enumerate(errors)]
        (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    table = angles.render().splitlines()
    assert "| test error at epoch 2 |" in table[0]   # the epoch both runs reached: they compare there
    assert table[2].startswith("| 0° | 3 | 5.00% | 7.00% | 5.00% | 0.0° | 0.0° |")
    assert table[3].startswith("| 85° | 2 | 40.00% | 40.00% | 40.00% | 85.0° | 42.5° |")


STAND_IN_NET_CLASSES = '''
import numpy as np
import torch
from torch import nn
from main import rho


class VFdisc(nn.Module):
    """Shaped like the authors' class (w[0] output, w[1] its B, w[2] the input layer)."""
    def __init__(self, args):
        super().__init__()
        out, hidden, inputs = args.size_tab
        self.w = nn.ModuleList([nn.Linear(hidden, out), nn.Linear(out, hidden, bias=False),
                                nn.Linear(inputs, hidden)])
        self.cuda = False

    def step(self, data):
        """A random move drawn from both generators, as their training draws its order and β sign."""
        with torch.no_grad():
            scale = 1e-3 * (2 * np.random.binomial(1, 0.5) - 1)
            for layer in self.w:
                layer.weight += scale * torch.randn(layer.weight.shape)
        return float(rho(self.w[2](data)).mean())
'''

STAND_IN_NET_FUNCTIONS = '''
def train(net, loader, epoch, rule):
    return sum(net.step(data) for data, _ in loader)


def evaluate(net, loader):
    return sum(float(net.w[0].weight.sum()) for _ in loader)
'''


def test_the_authors_code_harness_resumes_where_it_stopped(tmp_path, data_root):
    import subprocess
    import sys
    from pathlib import Path
    repo = tmp_path / "continualEP"
    repo.mkdir()
    (repo / "netClasses.py").write_text(STAND_IN_NET_CLASSES)
    (repo / "netFunctions.py").write_text(STAND_IN_NET_FUNCTIONS)
    script = Path(__file__).parents[1] / "benchmarks" / "authors_cvf.py"

    def run(out, epochs, *extra):
        return subprocess.run([sys.executable, str(script), "--authors-repo", str(repo), "--data-dir",
                               str(data_root), "--out", str(tmp_path / out), "--epochs", str(epochs),
                               "--samples", "60", *extra], capture_output=True, text=True)

    def records(out):
        lines = (tmp_path / out / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    assert run("whole", 3).returncode == 0
    assert run("pieces", 1).returncode == 0
    refused = run("pieces", 3)
    assert refused.returncode != 0 and "pass --resume" in refused.stderr
    assert run("pieces", 3, "--resume").returncode == 0
    whole = records("whole")
    assert [r["epoch"] for r in whole] == [1, 2, 3] and records("pieces") == whole
    assert 0.0 <= whole[-1]["angle/layer2"] <= 180.0 and whole[0] != whole[1]
    (repo / "netClasses.py").unlink()
    missing = run("none", 1)
    assert missing.returncode != 0 and "not a checkout of ernoult/continualEP" in missing.stderr


def test_free_phase_cycles_counts_every_sample_and_splits_the_push_by_settling(tmp_path):
    cycles = load_script("free_phase_cycles")
    folder = tiny_cvf(tmp_path, 0.01)
    checkpoint = folder / "checkpoint.pt"
    everyone = cycles.measure(checkpoint, None, batches=2, steps=30, tol=1e-4, push_batches=2, settle_tol=1e9)
    assert everyone["steady"] + everyone["period_2"] + everyone["neither"] == everyone["samples"] == 40
    push = everyone["push"]
    assert push["samples"] == {"unsettled": 0, "settled": 80}   # two batches of 20 at +β and at -β
    assert set(push["norm_growth_per_sample"]["settled"]) == {"layers.0.weight", "layers.1.weight",
                                                              "backward.layers.1"}
    assert all(v == 0.0 for v in push["norm_growth_per_sample"]["unsettled"].values())
    nobody = cycles.measure(checkpoint, None, batches=1, steps=30, tol=1e-4, push_batches=2, settle_tol=1e-30)
    assert nobody["push"]["samples"] == {"unsettled": 80, "settled": 0}
    assert nobody["push"]["norm_growth_per_sample"]["unsettled"] == pytest.approx(
        push["norm_growth_per_sample"]["settled"], rel=1e-9)
