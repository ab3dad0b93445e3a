"""Shared test fixtures: the shared data and reference vectors, one thread, float64 helpers."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from eqprop.cpu_kernels import KernelPhases, kernel_applies
from eqprop.cpu_kernels.library import CACHE_ENV_VAR

torch.set_num_threads(1)

SHARED = Path(os.environ.get("EQPROP_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared; missing is a failure in CI and a skip elsewhere."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"shared test material {path} is missing"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The data root holding mnist/ and cifar10/: ../shared/data (or $EQPROP_SHARED/data)."""
    for dataset in ("mnist", "cifar10"):
        shared_path("data", dataset)
    return shared_path("data")


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory):
    """The C kernel is built into a folder of this test session, not the user's cache."""
    previous = os.environ.get(CACHE_ENV_VAR)
    os.environ[CACHE_ENV_VAR] = str(tmp_path_factory.mktemp("kernels"))
    yield
    if previous is None:
        del os.environ[CACHE_ENV_VAR]
    else:
        os.environ[CACHE_ENV_VAR] = previous


class KernelOnly(KernelPhases):
    """:class:`~eqprop.cpu_kernels.KernelPhases` that fails instead of falling back to PyTorch:
    for tests that must run the C kernel."""

    def run_until(self, model, clamped, state, steps, beta=0.0, target=None, tol=0.0, check_every=1):
        assert kernel_applies(model, clamped, state)
        assert self.kernel_for(state[0].dtype) is not None, self.unavailable
        result = super().run_until(model, clamped, state, steps, beta, target, tol, check_every)
        assert result is not None
        return result


def require_c_compiler() -> None:
    """Skip where no C compiler exists (the C kernel's tests would test the PyTorch fallback)."""
    if not any(shutil.which(name) for name in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler on this machine")


def load_vectors(case: str, pure_f64: bool = False) -> dict[str, np.ndarray]:
    """Arrays of a reference case; with ``pure_f64`` the states and gradients of the pure-float64 run."""
    folder = shared_path("testvectors")
    with np.load(folder / f"{case}.npz", allow_pickle=False) as base:
        arrays = dict(base)
    if pure_f64:
        with np.load(folder / f"{case}_puref64.npz", allow_pickle=False) as pure:
            arrays.update(dict(pure))
    return arrays
