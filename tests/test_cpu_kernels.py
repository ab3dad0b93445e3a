"""eqprop's C kernel runs exactly the phases PyTorch's steps run, and steps aside where it cannot."""
from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from eqprop.cpu_kernels import KernelPhases, forget_loaded_kernels, kernel_applies, library, load_kernel
from eqprop.dynamics import run_phase
from eqprop.models import PMLP
from eqprop.models.vf import VFMLP

from conftest import KernelOnly, require_c_compiler


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    """Where a C compiler exists the kernel must build (else these tests would test the fallback)."""
    require_c_compiler()
    for dtype in (torch.float32, torch.float64):
        load_kernel(dtype)


def batch_for(model: PMLP, batch: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, model.sizes[0], generator=g, dtype=dtype)
    target = F.one_hot(torch.randint(0, model.sizes[-1], (batch,), generator=g), model.sizes[-1]).to(dtype)
    return x, target


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


ARCHITECTURES = [
    ([784, 512, 10], "scaled_sigmoid", "mse", True),       # laborieux-mnist
    ([40, 33, 17, 5], "hard_sigmoid", "mse", False),       # odd widths, nudge after σ
    ([12, 9], "half_hard_sigmoid", "mse", True),           # one layer: no top-down term
    ([30, 24, 24, 24, 24, 10], "scaled_sigmoid", "mse", False),  # deep
    ([50, 37, 21, 10], "scaled_sigmoid", "ce", True),      # softmax readout: the last size is the classes
    ([20, 16, 7], "half_hard_sigmoid", "ce", True),        # one state layer under the readout
]


@pytest.mark.parametrize("sizes,activation,loss,inside", ARCHITECTURES)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("batch,threads", [(37, 1), (37, 3), (2, 2), (1, 1)])
def test_kernel_phases_equal_pytorch_phases(sizes, activation, loss, inside, dtype, tolerance, batch, threads):
    torch.manual_seed(1)
    model = PMLP(sizes, activation, loss, inside).to(dtype)
    x, target = batch_for(model, batch, dtype)
    kernel = KernelOnly(threads)
    signs = torch.where(torch.rand(batch, 1) < 0.5, 1.0, -1.0).to(dtype)
    with torch.no_grad():
        clamped = model.clamp(x)
        start = model.init_state(x)
        assert kernel_applies(model, clamped, start)
        free = run_phase(model, clamped, start, 25)
        assert max_difference(kernel(model, clamped, start, 25), free) < tolerance
        for beta in (0.3, -0.7, 0.4 * signs, torch.tensor(0.25, dtype=dtype)):
            expected = run_phase(model, clamped, free, 9, beta, target)
            assert max_difference(kernel(model, clamped, free, 9, beta, target), expected) < tolerance
    assert not kernel.unavailable


def test_vector_field_model_uses_its_own_backward_weights():
    torch.manual_seed(2)
    model = VFMLP([20, 16, 16, 6], "scaled_sigmoid", "mse").double()
    model.reset_backward_(torch.Generator().manual_seed(5))
    x, target = batch_for(model, 11, torch.float64)
    with torch.no_grad():
        clamped = model.clamp(x)
        free = run_phase(model, clamped, model.init_state(x), 20)
        got = KernelOnly(2)(model, clamped, model.init_state(x), 20)
        assert max_difference(got, free) < 1e-12
        tied = PMLP([20, 16, 16, 6], "scaled_sigmoid", "mse").double()
        tied.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("backward")},
                             strict=False)
        assert max_difference(got, run_phase(tied, tied.clamp(x), tied.init_state(x), 20)) > 1e-6


@pytest.mark.parametrize("steps", [0, 1, 2])
def test_the_starting_state_is_read_not_overwritten(steps):
    model = PMLP([8, 6, 4], "scaled_sigmoid", "mse").double()
    x, target = batch_for(model, 9, torch.float64)
    with torch.no_grad():
        clamped = model.clamp(x)
        start = [torch.rand(9, n, dtype=torch.float64) for n in (6, 4)]
        kept = [s.clone() for s in start]
        got = KernelOnly(2)(model, clamped, start, steps, 0.5, target)
        expected = run_phase(model, clamped, start, steps, 0.5, target)
    assert all(torch.equal(a, b) for a, b in zip(start, kept))
    assert max_difference(got, expected) < 1e-12
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(got, start))


def test_results_do_not_depend_on_the_thread_count():
    model = PMLP([50, 40, 10], "scaled_sigmoid", "mse").float()
    x, target = batch_for(model, 64, torch.float32)
    with torch.no_grad():
        clamped = model.clamp(x)
        runs = [KernelOnly(threads)(model, clamped, model.init_state(x), 30) for threads in (1, 2, 5, 16)]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("activation", ["scaled_sigmoid", "hard_sigmoid"])
def test_nan_and_inf_propagate_as_in_pytorch(activation):
    model = PMLP([6, 5, 3], activation, "mse").double()
    x, target = batch_for(model, 8, torch.float64)
    with torch.no_grad():
        clamped = model.clamp(x)
        clamped.offsets[0][0, 0] = float("nan")
        clamped.offsets[0][1, :] = float("inf")
        clamped.offsets[0][2, :] = -float("inf")
        expected = run_phase(model, clamped, model.init_state(x), 4)
        got = KernelOnly(2)(model, clamped, model.init_state(x), 4)
    for a, b in zip(got, expected):
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.allclose(a.nan_to_num(), b.nan_to_num(), atol=1e-12)
    assert got[0][0].isnan().any() and not got[0][3:].isnan().any()


def test_float32_sigmoid_saturates_like_pytorch():
    model = PMLP([3, 4, 2], "scaled_sigmoid", "mse").float()
    x = torch.zeros(4, 3)
    with torch.no_grad():
        clamped = model.clamp(x)
        clamped.offsets[0].copy_(torch.tensor([[-1e4], [-90.0], [88.5], [1e4]]).expand(4, 4))
        got = KernelOnly(1)(model, clamped, model.init_state(x), 1)
        expected = run_phase(model, clamped, model.init_state(x), 1)
    assert torch.allclose(got[0], expected[0], atol=1e-30, rtol=0)


class OwnStep(PMLP):
    """A user model that changes the step: the kernel must not run it."""

    def step(self, clamped, state, beta=0.0, target=None):
        return [0.5 * s for s in super().step(clamped, state, beta, target)]


@pytest.mark.parametrize("case", ["tanh", "bfloat16", "own step", "autograd", "autocast", "shape of beta"])
def test_falls_back_to_pytorch_where_the_kernel_does_not_apply(case):
    torch.manual_seed(3)
    cls = OwnStep if case == "own step" else PMLP
    model = cls([10, 8, 4], activation="tanh" if case == "tanh" else "scaled_sigmoid", loss="mse")
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float64
    model = model.to(dtype)
    x, target = batch_for(model, 6, dtype)
    beta = torch.full((3, 2), 0.1, dtype=dtype) if case == "shape of beta" else 0.2
    if case == "shape of beta":  # per-sample β of the wrong shape: PyTorch decides (here: broadcast error)
        with torch.no_grad(), pytest.raises(RuntimeError):
            KernelPhases(2)(model, model.clamp(x), model.init_state(x), 3, beta, target)
        return
    grad = torch.enable_grad() if case == "autograd" else torch.no_grad()
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=case == "autocast")
    with grad, autocast:
        clamped = model.clamp(x)
        expected = run_phase(model, clamped, model.init_state(x), 5, beta, target)
        got = KernelPhases(2)(model, clamped, model.init_state(x), 5, beta, target)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_without_a_compiler_the_phases_run_in_pytorch(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(library.CACHE_ENV_VAR, str(tmp_path / "cache"))
    forget_loaded_kernels()
    try:
        model = PMLP([10, 8, 4]).double()
        x, target = batch_for(model, 6, torch.float64)
        runner = KernelPhases(2)
        with torch.no_grad(), pytest.warns(RuntimeWarning, match="C compiler .* not found"):
            got = runner(model, model.clamp(x), model.init_state(x), 5)
        assert runner.unavailable
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, then quietly PyTorch
            again = runner(model, model.clamp(x), model.init_state(x), 5)
            expected = run_phase(model, model.clamp(x), model.init_state(x), 5)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert all(torch.equal(a, b) for a, b in zip(again, expected))
    finally:
        forget_loaded_kernels()


def test_a_build_is_cached_and_keyed_by_its_inputs(monkeypatch, tmp_path):
    monkeypatch.setenv(library.CACHE_ENV_VAR, str(tmp_path))
    forget_loaded_kernels()
    try:
        load_kernel(torch.float64)
        built = sorted(tmp_path.glob("mlp_phase-*.so"))
        assert len(built) == 1 and not list(tmp_path.glob(".*"))  # no temporary file left behind
        forget_loaded_kernels()
        load_kernel(torch.float64)
        assert sorted(tmp_path.glob("mlp_phase-*.so")) == built  # reused, not rebuilt
        load_kernel(torch.float32)
        assert len(list(tmp_path.glob("mlp_phase-*.so"))) == 2
    finally:
        forget_loaded_kernels()


def test_a_target_on_another_device_is_left_to_pytorch():
    model = PMLP([10, 8, 4]).double()
    x, target = batch_for(model, 6, torch.float64)
    with torch.no_grad(), pytest.raises(RuntimeError, match="device"):  # PyTorch's device error, not a crash
        KernelPhases(2)(model, model.clamp(x), model.init_state(x), 3, 0.5, target.to("meta"))


@pytest.fixture
def fresh_builds(monkeypatch, tmp_path):
    """Builds go to a new folder; what load_kernel found before is forgotten, then and after."""
    monkeypatch.setenv(library.CACHE_ENV_VAR, str(tmp_path / "cache"))
    forget_loaded_kernels()
    yield tmp_path
    forget_loaded_kernels()


def test_compiler_command_with_arguments_and_its_errors(monkeypatch, fresh_builds):
    compiler = next(shutil.which(name) for name in ("cc", "gcc", "clang") if shutil.which(name))
    monkeypatch.setenv("CC", f"{compiler} -DEQPROP_UNUSED=1")
    load_kernel(torch.float64)  # CC may hold arguments
    forget_loaded_kernels()
    monkeypatch.setenv("CC", f"{compiler} -DREAL=int")  # a broken build: its error line is reported
    with pytest.raises(library.KernelUnavailable, match="error"):
        load_kernel(torch.float64)


def test_without_a_cache_folder_builds_go_to_a_private_temporary_folder(monkeypatch, fresh_builds):
    def no_home() -> None:
        raise RuntimeError("Could not determine home directory.")
    monkeypatch.setattr(library, "cache_folder", no_home)
    monkeypatch.setattr(library.tempfile, "gettempdir", lambda: str(fresh_builds))
    shared = fresh_builds / f"eqprop-kernels-{os.getuid()}"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # writable by anyone: code there could be someone else's
    with pytest.raises(library.KernelUnavailable, match="only this user"):
        load_kernel(torch.float64)
    shared.chmod(0o700)
    forget_loaded_kernels()
    load_kernel(torch.float64)
    assert list(shared.glob("mlp_phase-*.so"))
