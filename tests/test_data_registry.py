"""load_dataset dispatch and the default data root."""

from __future__ import annotations

from pathlib import Path

import pytest

from eqprop.data import DATASETS, DataError, load_dataset, resolve_data_root


def test_dataset_names() -> None:
    assert list(DATASETS) == ["mnist", "cifar10", "mnist-demo", "npz"]


def test_explicit_data_dir_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EQPROP_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "given") == tmp_path / "given"
    assert resolve_data_root(str(tmp_path / "given")) == tmp_path / "given"


def test_environment_variable_comes_next(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EQPROP_DATA", str(tmp_path / "env"))
    assert resolve_data_root(None) == tmp_path / "env"


def test_user_cache_is_the_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EQPROP_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_root(None) == tmp_path / "xdg" / "eqprop" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_root(None) == tmp_path / "home" / ".cache" / "eqprop" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec says to ignore relative paths
    assert resolve_data_root(None) == tmp_path / "home" / ".cache" / "eqprop" / "data"


def test_missing_root_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EQPROP_DATA", str(tmp_path))
    with pytest.raises(DataError, match=f"{tmp_path / 'cifar10' / 'test_batch.bin'}"):
        load_dataset("cifar10", "test", None)


def test_unknown_names_are_reported() -> None:
    with pytest.raises(DataError, match="unknown dataset 'svhn': choose one of mnist, cifar10, mnist-demo"):
        load_dataset("svhn", "train", None)
    with pytest.raises(DataError, match="unknown split 'valid': choose one of train, test"):
        load_dataset("mnist", "valid", None)


def test_demo_needs_no_data_root(tmp_path: Path) -> None:
    data = load_dataset("mnist-demo", "test", tmp_path / "does-not-exist", download=True)
    assert data.name == "mnist-demo" and len(data) == 1000
    assert not (tmp_path / "does-not-exist").exists()
