"""Solvers: each reaches plain iteration's steady state within its tolerance; ``fixed`` is the
papers' loop exactly; Anderson's safeguard fires and still converges; a phase that cannot meet
its tolerance stops at the cap and says so; the run builder refuses what cannot work."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import KernelOnly, require_c_compiler
from eqprop import PCNN, PMLP, Phases, build_estimator
from eqprop.backends import Backend, CpuKernelBackend
from eqprop.build import build_solvers, check_estimator_fits_model
from eqprop.config import ConfigError
from eqprop.dynamics import run_alternating, run_phase
from eqprop.heads import SquaredError
from eqprop.models.base import EnergyModel
from eqprop.models.vf import VFMLP
from eqprop.solvers import SOLVERS, build_solver, state_change

from test_training import small_config

CONVERGING = ("tolerance", "alternating", "anderson")


# freshly initialised at the default scale, these maps contract to one fixed point (plain iteration
# needs 12-49 steps to 1e-7). At init_scale 1.5 the CNN has several fixed points: plain iteration,
# alternating sweeps and Anderson then reach different ones, which no solver can be blamed for.
def mlp(sizes, loss="mse", seed=0, cls=PMLP, **kwargs):
    return cls(sizes, loss=loss, generator=torch.Generator().manual_seed(seed), init_scale=1.0, **kwargs).double()


MODELS = {
    "mlp_1h": lambda: mlp([12, 16, 4]),
    "mlp_2h": lambda: mlp([12, 16, 16, 4]),
    "mlp_3h_ce": lambda: mlp([12, 16, 14, 12, 4], loss="ce"),
    "vf_mlp": lambda: mlp([12, 16, 16, 4], cls=VFMLP),
    "cnn": lambda: PCNN((1, 10, 10), [4, 6], [3, 3], [1, 1], [1, 1], [4], activation="scaled_sigmoid",
                        loss="mse", generator=torch.Generator().manual_seed(0), init_scale=1.0).double(),
}


def batch(model, size=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (model.input_shape if isinstance(model, PCNN) else (model.sizes[0],))
    x = torch.rand(size, *shape, generator=g, dtype=torch.float64)
    target = F.one_hot(torch.randint(0, model.head.classes, (size,), generator=g), model.head.classes).double()
    return x, target


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("name", CONVERGING)
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_each_solver_reaches_plain_iterations_steady_state(kind, name, beta):
    model = MODELS[kind]()
    x, target = batch(model)
    clamped = model.clamp(x)
    start = model.init_state(x)
    with torch.no_grad():
        reference = run_phase(model, clamped, start, 600, beta, target)
        assert float(state_change(model.step(clamped, reference, beta, target), reference).max()) < 1e-13
        plain, plain_stats = build_solver("tolerance", tol=1e-8, check_every=1)(model, clamped, start, 600, beta,
                                                                                   target)
        for tol in (1e-4, 1e-7):
            state, stats = build_solver(name, tol=tol, check_every=1)(model, clamped, start, 600, beta, target)
            assert stats.converged and float(stats.residual.max()) <= tol
            # the distance to the steady state is the residual over (1 - contraction): 20 tol is ample here
            assert float(state_change(state, reference).max()) <= 20 * tol, (kind, name, tol)
    if name != "tolerance" and kind != "mlp_1h":
        assert stats.steps < plain_stats.steps   # they accelerate (from 31-49 plain steps to 16-25)


def test_fixed_solver_is_the_papers_loop_bit_for_bit():
    model = MODELS["mlp_2h"]()
    x, target = batch(model)
    clamped = model.clamp(x)
    with torch.no_grad():
        free = run_phase(model, clamped, model.init_state(x), 17)
        state, stats = build_solver("fixed")(model, clamped, model.init_state(x), 17)
        assert all(torch.equal(a, b) for a, b in zip(state, free))
        nudged = run_phase(model, clamped, free, 5, 0.4, target)
        state, stats = build_solver("fixed")(model, clamped, free, 5, 0.4, target)
        assert all(torch.equal(a, b) for a, b in zip(state, nudged))
    before = run_phase(model, clamped, free, 4, 0.4, target)
    assert torch.equal(stats.residual, state_change(nudged, before)) and stats.steps == 5
    assert stats.converged is None


def test_fixed_solver_on_the_c_kernel_is_its_single_call():
    require_c_compiler()
    model = MODELS["mlp_2h"]()
    x, _ = batch(model, size=12)
    clamped = model.clamp(x)
    kernel = KernelOnly(threads=2)
    with torch.no_grad():
        whole = kernel(model, clamped, model.init_state(x), 23)
        state, _ = build_solver("fixed", kernel)(model, clamped, model.init_state(x), 23)
    assert all(torch.equal(a, b) for a, b in zip(state, whole))


@pytest.mark.parametrize("name", CONVERGING)
def test_solvers_on_the_c_kernel_equal_pytorch(name):
    require_c_compiler()
    model = MODELS["mlp_2h"]()
    x, target = batch(model, size=12)
    clamped = model.clamp(x)
    backend = CpuKernelBackend(2)
    options = {"tol": 1e-6, "check_every": 3}
    with torch.no_grad():
        eager, eager_stats = build_solver(name, **options)(model, clamped, model.init_state(x), 300, 0.2, target)
        cls = SOLVERS[name]
        fast, fast_stats = build_solver(name, backend.runner(cls.sweep), **options)(
            model, clamped, model.init_state(x), 300, 0.2, target)
    assert fast_stats.steps == eager_stats.steps
    assert float(state_change(fast, eager).max()) < 1e-12


@pytest.mark.parametrize("name", ["tolerance", "alternating"])
@pytest.mark.parametrize("backend", ["eager", "kernel"])
def test_a_samples_result_does_not_depend_on_the_rest_of_its_batch(name, backend):
    """Each sample stops at the first check where it meets the tolerance, alone or in a batch."""
    if backend == "kernel":
        require_c_compiler()
    model = MODELS["mlp_2h"]()
    x, target = batch(model, size=10)
    x[:5] *= 4.0   # samples that settle at different checks
    runner = KernelOnly(threads=3, sweep=SOLVERS[name].sweep) if backend == "kernel" else None
    solver = build_solver(name, runner, tol=1e-5, check_every=3)
    clamped = model.clamp(x)

    def sample(i):  # the batch's clamped input cut to sample i (its drive as computed for the batch)
        rows = slice(i, i + 1)
        return replace(clamped, x=x[rows], drive=clamped.drive[rows],
                       offsets=[clamped.offsets[0][rows]] + clamped.offsets[1:])

    with torch.no_grad():
        together, stats = solver(model, clamped, model.init_state(x), 200, 0.2, target)
        alone = [solver(model, sample(i), model.init_state(x[i:i + 1]), 200, 0.2, target[i:i + 1])
                 for i in range(x.shape[0])]
    assert len({steps for _, s in alone for steps in [s.steps]}) > 1   # they do settle at different checks
    assert stats.steps == max(s.steps for _, s in alone)
    # the kernel's rows go through the same operations in any batch; PyTorch's matmuls round
    # differently for another batch size
    tolerance = 0.0 if backend == "kernel" else 1e-12
    for i, (state, sample_stats) in enumerate(alone):
        torch.testing.assert_close(sample_stats.residual, stats.residual[i:i + 1], rtol=0, atol=tolerance)
        for a, b in zip(state, together):
            torch.testing.assert_close(a, b[i:i + 1], rtol=0, atol=tolerance)


@pytest.mark.parametrize("kind", ["mlp_1h", "mlp_2h", "mlp_3h_ce", "vf_mlp"])
@pytest.mark.parametrize("beta", [0.0, 0.5, "per_sample"])
def test_closed_form_half_steps_equal_the_generic_ones(kind, beta):
    model = MODELS[kind]()
    x, target = batch(model)
    if beta == "per_sample":
        beta = torch.linspace(-0.5, 0.5, x.shape[0], dtype=torch.float64).unsqueeze(1)
    clamped = model.clamp(x)
    with torch.no_grad():
        state = run_phase(model, clamped, model.init_state(x), 3)
        for parity in (0, 1):
            fast = model.half_step(clamped, state, parity, beta, target)
            generic = EnergyModel.half_step(model, clamped, state, parity, beta, target)
            for n, (a, b) in enumerate(zip(fast, generic)):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
                if n % 2 != parity:
                    assert a is state[n]   # untouched layers are the same tensors


class Affine(EnergyModel):
    """A one-unit toy map ``s ← a s + c`` (a contraction for |a| < 1, an oscillation for a = -1)."""

    def __init__(self, a: float, c: float = 1.0) -> None:
        super().__init__()
        self.a, self.c = a, c
        self.head = SquaredError(1)
        self.dummy = nn.Parameter(torch.zeros(()))

    def init_state(self, x):
        return [x.new_zeros(x.shape[0], 1)]

    def step(self, clamped, state, beta=0.0, target=None):
        return [self.a * state[0] + self.c]


def test_anderson_safeguard_fires_on_an_ill_conditioned_system_and_still_converges():
    # a one-unit state: with two or more stored residuals the least-squares system is singular. With
    # a = 1/2 the plain steps' residuals are powers of two, so the Gram matrix is singular exactly,
    # not just to rounding, on every machine (with a = 0.9 one processor's LU met a zero pivot and
    # another's a tiny one, and no safeguard fired there)
    model = Affine(0.5)
    x = torch.zeros(3, 1, dtype=torch.float64)
    solver = build_solver("anderson", tol=1e-9, check_every=1, memory=4, regularization=0.0)
    state, stats = solver(model, model.clamp(x), model.init_state(x), 400)
    assert int(stats.fallbacks) > 0
    assert stats.converged and torch.allclose(state[0], torch.full_like(state[0], 2.0), atol=1e-7)


def test_anderson_safeguard_counts_nothing_on_a_well_posed_problem():
    model = MODELS["mlp_2h"]()
    x, _ = batch(model)
    _, stats = build_solver("anderson", tol=1e-8, check_every=1)(model, model.clamp(x), model.init_state(x), 300)
    assert stats.converged and int(stats.fallbacks) == 0


@pytest.mark.parametrize("name", CONVERGING)
def test_a_phase_that_cannot_meet_its_tolerance_stops_at_the_cap_and_says_so(name):
    model = Affine(-1.0)   # 0, 1, 0, 1, ...: plain iteration never settles
    x = torch.zeros(2, 1, dtype=torch.float64)
    state, stats = build_solver(name, tol=1e-6, check_every=4)(model, model.clamp(x), model.init_state(x), 10)
    if name == "anderson":   # Anderson solves a linear map; a cap of 1 step cannot
        state, stats = build_solver(name, tol=1e-6, check_every=4)(model, model.clamp(x), model.init_state(x), 1)
        assert stats.steps == 1
    else:
        assert stats.steps == 10
    assert stats.converged is False and float(stats.residual.max()) == 1.0


def test_steps_and_residuals_are_reported_per_phase_by_the_estimators():
    model = MODELS["mlp_2h"]()
    x, target = batch(model)
    solver = build_solver("tolerance", tol=1e-6, check_every=2)
    phases = Phases(400, 300, 0.1, solver=solver, nudged_solver=solver)
    result = build_estimator("symmetric", phases).estimate(model, x, target)
    assert result.free_stats.converged and result.free_stats.steps < 400
    assert result.nudged_stats.converged and result.nudged_stats.steps < 300
    assert result.nudged_stats.residual.shape == (2 * x.shape[0],)   # both nudged phases, side by side
    fixed = build_estimator("symmetric", Phases(400, 300, 0.1)).estimate(model, x, target)
    for a, b in zip(result.direction, fixed.direction):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_the_nudged_phases_default_to_plain_iteration():
    """Unless named, the nudged phases keep the papers' dynamics: fixed steps, or with a faster free
    solver plain iteration stopped at the tolerance (a non-converging nudged phase then runs its
    T2 steps exactly as fixed does)."""
    (free, nudged), _ = build_solvers(small_config(), Backend())
    assert free.name == nudged.name == "fixed"
    (free, nudged), _ = build_solvers(small_config(solver={"name": "anderson", "tol": 1e-5}), Backend())
    assert (free.name, nudged.name, nudged.tol) == ("anderson", "tolerance", 1e-5)
    (_, nudged), _ = build_solvers(small_config(solver={"name": "anderson", "nudged": "fixed"}), Backend())
    assert nudged.name == "fixed"
    assert Phases(5, 3, 0.1, solver=free).nudge_solver().name == "fixed"


def test_unknown_solver_and_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown solver 'newton'; choose one of alternating, anderson"):
        build_solver("newton")
    with pytest.raises(ValueError, match="tol must be > 0"):
        build_solver("tolerance", tol=0.0)
    with pytest.raises(ValueError, match="solver anderson: .*unexpected keyword"):
        build_solver("anderson", momentum=0.5)
    with pytest.raises(ConfigError, match="solver.name: unknown solver 'newton'"):
        small_config(solver={"name": "newton"})
    with pytest.raises(ConfigError, match="solver.sweep: not used by solver tolerance$"):
        small_config(solver={"name": "tolerance", "sweep": "alternating"})
    with pytest.raises(ConfigError, match="solver.tol: not used by solver fixed$"):
        small_config(solver={"tol": 1e-6})
    small_config(solver={"name": "fixed", "nudged": "tolerance", "tol": 1e-6})   # the nudged solver uses it
    with pytest.raises(ConfigError, match="train.compile: compiles the fixed solver's phases only"):
        small_config(solver={"name": "anderson"}, train={"compile": True})


def test_a_sweep_the_backend_cannot_run_is_run_eagerly_with_one_line():
    class SynchronousOnly(Backend):
        name = "synchronous_only"

        def supports(self, sweep):
            return sweep == "synchronous"

    config = small_config(solver={"name": "alternating", "nudged": "tolerance"})
    (free, nudged), notes = build_solvers(config, SynchronousOnly())
    assert free.runner is run_alternating and nudged.runner is run_phase
    assert notes == ["solver alternating: the synchronous_only backend runs synchronous steps only; its "
                     "alternating sweeps run in PyTorch"]
    (free, nudged), notes = build_solvers(config, CpuKernelBackend(1))
    assert free.runner.sweep == "alternating" and nudged.runner.sweep == "synchronous" and notes == []


@pytest.mark.parametrize("kind, nudge", [("mlp_1h", "inside"), ("mlp_2h", "outside"), ("mlp_3h_ce", "inside"),
                                         ("vf_mlp", "inside")])
@pytest.mark.parametrize("beta", [0.0, 0.3, "per_sample"])
def test_the_c_kernels_alternating_sweeps_equal_pytorchs(kind, nudge, beta):
    require_c_compiler()
    model = MODELS[kind]()
    model.head.nudge_inside = nudge == "inside"
    x, target = batch(model, size=13)
    if beta == "per_sample":
        beta = torch.linspace(-0.4, 0.4, x.shape[0], dtype=torch.float64).unsqueeze(1)
    clamped = model.clamp(x)
    with torch.no_grad():
        start = run_phase(model, clamped, model.init_state(x), 2)
        for steps in (0, 1, 4, 7):
            expected = run_alternating(model, clamped, start, steps, beta, target)
            got = KernelOnly(threads=3, sweep="alternating")(model, clamped, start, steps, beta, target)
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_an_estimator_that_cannot_train_the_model_fails_at_build_time():
    vf = mlp([6, 5, 4, 3], cls=VFMLP)
    with pytest.raises(ConfigError, match="symmetric needs a primitive Φ"):
        check_estimator_fits_model(build_estimator("symmetric", Phases(5, 2, 0.1)), vf)
    with pytest.raises(ConfigError, match="c_vf needs a vector-field model"):
        check_estimator_fits_model(build_estimator("c_vf", Phases(5, 2, 0.1)), mlp([6, 5, 3]))


def test_anderson_keeps_a_channels_last_state_channels_last_and_solves_it():
    model = MODELS["cnn"]().to(memory_format=torch.channels_last)
    x, _ = batch(model)
    clamped = model.clamp(x)
    start = model.init_state(x)
    assert start[0].is_contiguous(memory_format=torch.channels_last) and not start[0].is_contiguous()
    with torch.no_grad():
        reference = run_phase(model, clamped, start, 600)
        state, stats = build_solver("anderson", tol=1e-8, check_every=1)(model, clamped, start, 600)
    assert stats.converged and float(state_change(state, reference).max()) < 1e-6
    assert state[0].is_contiguous(memory_format=torch.channels_last)
