"""The reproduction table is rendered from the records in the repository, never from guesses."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_table_shows_recorded_rows_and_says_not_run_for_the_others(tmp_path, monkeypatch):
    reproduction = load_script("reproduction")
    monkeypatch.setattr(reproduction, "ROOT", tmp_path)
    for name, final, best in (("ep-2h", 0.0231, 0.0190), ("ep-2h@anderson", 0.0240, 0.0201),
                              ("cvf-2h@x", 0.03, 0.02), ("cep-1h@lost", 0.03, 0.02)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "record.json").write_text(json.dumps({
            "command": f"eqprop train --preset {name.split('@')[0]}", "machine": "test CPU, 2 cores",
            "epochs_run": 50, "epochs_target": 50, "final_test_error": final, "best_test_error": best,
            **({"collapses": [40, 45]} if name == "cvf-2h@x" else {}),
            **({"epochs_run": 46, "epochs_target": 150, "stopped": "checkpoint lost"} if name == "cep-1h@lost" else {})}))
    table = reproduction.table().splitlines()
    assert table[0].startswith("| row | paper | eqprop (final, best) | difference | epochs run |")
    rows = {line.split("`")[1]: line for line in table[2:]}
    assert "| 2.00% | 2.31%, 1.90% | +0.31 pt | 50 of 50 | `eqprop train --preset ep-2h` | test CPU" in rows["ep-2h"]
    assert "| 2.40%, 2.01% | +0.40 pt |" in rows["ep-2h@anderson"]
    assert rows["cep-2h"].endswith("| 2.50% | not run | | | | |")
    assert "| 3.00%, 2.00% | (stopped: checkpoint lost) | 46 of 150 |" in rows["cep-1h@lost"]
    assert "| – | not run |" in rows["cvf-1h"]   # a row without a single paper figure
    assert "| 3.00%, 2.00%; collapsed at epoch 40, 45 and rolled back |" in rows["cvf-2h@x"]


def test_a_row_whose_paper_figure_is_for_an_earlier_epoch_is_compared_there(tmp_path, monkeypatch):
    reproduction = load_script("reproduction")
    monkeypatch.setattr(reproduction, "ROOT", tmp_path)
    folder = tmp_path / "laborieux-mnist"
    folder.mkdir()
    (folder / "record.json").write_text(json.dumps({
        "command": "eqprop train --preset laborieux-mnist", "machine": "test CPU", "epochs_run": 2,
        "epochs_target": 2, "final_test_error": 0.0306, "best_test_error": 0.0306, "test_errors": [0.0421, 0.0306]}))
    row = next(line for line in reproduction.table().splitlines() if "`laborieux-mnist`" in line)
    assert "| 4.11% | 3.06%, 3.06%; 4.21% after epoch 1 | +0.10 pt | 2 of 2 |" in row


def test_a_record_is_written_from_the_run_folder(tmp_path):
    from eqprop.config import validate_config
    from eqprop.training import train
    reproduction = load_script("reproduction")
    config = validate_config({"name": "demo", "data": {"dataset": "mnist-demo", "train_subset": 100,
                                                       "test_subset": 50},
                              "dynamics": {"t1": 5, "t2": 2}, "train": {"epochs": 2, "device": "cpu"}})
    train(config, tmp_path, log=lambda _: None)
    entry = reproduction.record(tmp_path, "eqprop train --preset demo --epochs 2", "a test")
    assert entry["epochs_run"] == 2 and entry["epochs_target"] == 2 and entry["note"] == "a test"
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert entry["final_test_error"] == lines[-1]["test_error"]
    assert entry["best_test_error"] == min(r["test_error"] for r in lines)
    assert json.loads((tmp_path / "record.json").read_text()) == entry and "collapses" not in entry
    (tmp_path / "rolled_back.jsonl").write_text(json.dumps({"epoch": 2, "test_error": 0.5}) + "\n" + json.dumps(
        {"epoch": 3, "collapse": "epoch 3: ...", "rollback": 1}) + "\n")
    assert reproduction.record(tmp_path, "eqprop train", None)["collapses"] == [3]
    # a run made elsewhere (a lent GPU) keeps that machine and commit; no checkpoint is needed
    (tmp_path / "checkpoint.pt").unlink()
    elsewhere = reproduction.record(tmp_path, "eqprop train", None, "NVIDIA X", "abc123")
    assert (elsewhere["machine"], elsewhere["commit"], elsewhere["epochs_target"]) == ("NVIDIA X", "abc123", 2)


def test_the_readme_shows_the_table_rendered_from_the_records():
    reproduction = load_script("reproduction")
    readme = (BENCHMARKS.parent / "README.md").read_text()
    assert reproduction.readme_with_table(readme, reproduction.table()) == readme, \
        "README's reproduction table is stale: python benchmarks/reproduction.py table --readme"
