"""The C-VF evidence scripts: the feedback of continual updates, and the angle experiment's table."""
from __future__ import annotations

import json

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
    for angle, errors in ((85.0, [0.5, 0.4]), (0.0, [0.1, 0.05])):
        folder = angles.folder(angle)
        folder.mkdir()
        lines = [json.dumps({"epoch": e + 1, "test_error": err, "angle/layer2": angle / (e + 1)})
                 for e, err in enumerate(errors)]
        (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    table = angles.render().splitlines()
    assert table[2].startswith("| 0° | 2 | 5.00% | 5.00% | 0.0° | 0.0° |")
    assert table[3].startswith("| 85° | 2 | 40.00% | 40.00% | 85.0° | 42.5° |")
