"""CUDA: the same results as on the CPU, no host synchronisation in the phases, CUDA graphs
equal to eager phases, TF32 within EP's own bias, exact resume. Skipped without a GPU
(CI has none); run on a GPU machine with ``python -m pytest -q tests/test_cuda.py``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eqprop.cuda_graphs import PhaseGraphs
from eqprop.dynamics import run_phase
from eqprop.estimators import Phases, build_estimator
from eqprop.models.cnn import PCNN
from eqprop.models.mlp import PMLP
from eqprop.solvers import build_solver
from eqprop.training import load_checkpoint, train
from eqprop.training.trainer import CHECKPOINT

from test_training import quiet, small_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_matmuls():
    """Full float32 matmuls unless a test asks for TF32 (the library's default is on)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def mlp(loss: str = "ce", seed: int = 0) -> PMLP:
    return PMLP([20, 16, 12, 5], activation="half_hard_sigmoid", loss=loss,
                generator=torch.Generator().manual_seed(seed))


def cnn(loss: str = "ce", seed: int = 0, **kwargs) -> PCNN:
    return PCNN((3, 16, 16), [8, 12, 16], [3, 3, 3], [1, 1, 1], [1, 1, 0], [5] if loss == "ce" else [7, 5],
                activation="hard_sigmoid", loss=loss, generator=torch.Generator().manual_seed(seed),
                **kwargs)


def batch(model, size: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = (size, model.sizes[0]) if isinstance(model, PMLP) else (size, *model.input_shape)
    x = torch.rand(shape, generator=g)
    target = F.one_hot(torch.randint(0, 5, (size,), generator=g), 5).float()
    return x, target


def relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((p.double().cpu() - q.double().cpu()).square().sum()) for p, q in zip(a, b))
    den = sum(float(q.double().cpu().square().sum()) for q in b)
    assert den > 0, "the reference is zero: the comparison would prove nothing"
    return (num / den) ** 0.5


MODELS = {"mlp_ce": lambda: mlp("ce"), "mlp_mse": lambda: mlp("mse"),
          "cnn_ce": lambda: cnn("ce"), "cnn_mse": lambda: cnn("mse")}


@pytest.mark.parametrize("estimator", ["one_sided", "symmetric", "bptt"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cuda_float64_equals_cpu(name, estimator):
    model = MODELS[name]().double()
    x, target = (t.double() for t in batch(model))
    phases = Phases(t1=15, t2=5, beta=0.3)
    on_cpu = build_estimator(estimator, phases).estimate(model, x, target).direction
    on_gpu = build_estimator(estimator, phases).estimate(model.to(CUDA), x.to(CUDA), target.to(CUDA)).direction
    assert relative(on_gpu, on_cpu) < 1e-10


@pytest.mark.parametrize("estimator", ["symmetric", "one_sided", "random_sign", "bptt"])
@pytest.mark.parametrize("name", ["mlp_ce", "cnn_ce", "cnn_mse"])
def test_phases_never_wait_for_the_host(name, estimator):
    model = MODELS[name]().to(CUDA)
    x, target = (t.to(CUDA) for t in batch(model))
    est = build_estimator(estimator, Phases(t1=10, t2=4, beta=0.3), generator=torch.Generator().manual_seed(0))
    est.fill_grads(model, x, target)            # warm-up: kernel selection, lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")     # any synchronising call now raises
    try:
        est.fill_grads(model, x, target)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def two_updates(model, estimator: str, graphs: bool, autocast: bool = False, batches: int = 2):
    """SGD steps on ``batches`` batches, then the eval-mode free phase: directions, final state,
    and the training-mode phases that were captured as graphs."""
    runner = PhaseGraphs() if graphs else run_phase
    est = build_estimator(estimator, Phases(t1=12, t2=4, beta=0.4, solver=build_solver("fixed", runner)),
                          generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    directions = []
    for seed in range(batches):
        x, target = (t.to(CUDA) for t in batch(model, seed=seed))
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            directions += est.train_step(model, x, target, optimizer).direction
    captured = len(runner._graphs) if graphs else 0
    model.eval()
    x, _ = (t.to(CUDA) for t in batch(model, seed=9))
    with torch.no_grad():
        state = runner(model, model.clamp(x), model.init_state(x), 12)
    return directions, state, captured


@pytest.mark.parametrize("estimator", ["symmetric", "one_sided", "random_sign", "bptt"])
@pytest.mark.parametrize("name", ["mlp_ce", "mlp_mse", "cnn_ce", "cnn_mse"])
def test_cuda_graphs_equal_eager_phases_and_see_updated_weights(name, estimator):
    eager = two_updates(MODELS[name]().to(CUDA), estimator, graphs=False)
    graphed = two_updates(MODELS[name]().to(CUDA), estimator, graphs=True)
    assert graphed[2] > 0                      # the training phases were captured, not run eagerly
    assert relative(graphed[0], eager[0]) < 1e-6
    assert relative(graphed[1], eager[1]) < 1e-6


def test_cuda_graphs_under_bf16_autocast_see_updated_weights():
    eager = two_updates(cnn("ce").to(CUDA), "symmetric", graphs=False, autocast=True)
    graphed = two_updates(cnn("ce").to(CUDA), "symmetric", graphs=True, autocast=True)
    assert graphed[2] > 0
    # a stale autocast cache (weights cast once, before the capture) gave about 1e-2 here
    assert relative(graphed[0], eager[0]) < 1e-4
    assert relative(graphed[1], eager[1]) < 1e-4


def test_cuda_graphs_replay_each_batchs_dropout_mask():
    """The mask travels with the clamped input: graphed dropout phases equal eager ones, batch
    after batch (a stale mask would give the second batch the first batch's mask)."""
    models = [cnn("ce", dropout=0.3).to(CUDA) for _ in range(2)]
    for model in models:
        model.dropout_generator = torch.Generator(device=CUDA).manual_seed(0)
    eager = two_updates(models[0], "symmetric", graphs=False, batches=3)
    graphed = two_updates(models[1], "symmetric", graphs=True, batches=3)
    assert graphed[2] > 0                      # the training phases were captured
    assert relative(graphed[0], eager[0]) < 1e-5
    assert relative(graphed[1], eager[1]) < 1e-5


def test_tf32_error_is_below_the_estimators_own_bias():
    """TF32 convolutions change the symmetric estimate by less than its distance to BPTT."""
    model = cnn("ce").to(CUDA).double()
    x, target = (t.to(CUDA) for t in batch(model, size=16))
    phases = Phases(t1=40, t2=10, beta=0.5)
    exact = build_estimator("symmetric", phases).estimate(model, x.double(), target.double()).direction
    bptt = build_estimator("bptt", phases, bptt_steps="all").estimate(model, x.double(), target.double()).direction
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    tf32 = build_estimator("symmetric", phases).estimate(model.float(), x, target).direction
    assert relative(tf32, exact) < 0.5 * relative(exact, bptt)
    assert relative(tf32, exact) < 1e-2    # float32 alone is about 1e-4 here; bf16 about 0.3


@pytest.mark.parametrize("graphs", [False, True])
def test_resumed_cuda_run_equals_uninterrupted_run(tmp_path, graphs):
    config = small_config(estimator={"name": "symmetric"}, optim={"name": "sgd", "lr": [0.05, 0.02]},
                          train={"epochs": 2, "device": "cuda", "cuda_graphs": graphs})
    full = train(config, tmp_path / "full", log=quiet)
    first = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 1})})
    train(first, tmp_path / "split", log=quiet)
    resumed = train(config, tmp_path / "split", resume=True, log=quiet)
    a = load_checkpoint(tmp_path / "full" / CHECKPOINT)["model"]
    b = load_checkpoint(tmp_path / "split" / CHECKPOINT)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["test_error"] for r in resumed] == [r["test_error"] for r in full]
    assert full[-1]["test_error"] < 0.6


def test_channels_last_model_trains_with_a_fused_optimizer():
    """The layout of the preset CIFAR-10 runs: channels-last weights, fused SGD, graphed phases."""
    model = cnn("ce").to(CUDA).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
    est = build_estimator("symmetric", Phases(t1=12, t2=4, beta=0.4, solver=build_solver("fixed", PhaseGraphs())))
    x, target = (t.to(CUDA) for t in batch(model))
    before = [p.detach().clone() for p in model.parameters()]
    est.train_step(model, x.contiguous(memory_format=torch.channels_last), target, optimizer)
    assert all(p.grad.stride() == p.stride() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("name", ["fixed", "tolerance", "alternating", "anderson"])
@pytest.mark.parametrize("model_name", ["mlp_ce", "cnn_mse"])
def test_every_solver_replayed_as_cuda_graphs_equals_eager(name, model_name):
    """A solver on the CUDA-graphs backend (its steps replayed between checks) computes what it
    computes eagerly, in float64, free and nudged."""
    from eqprop.backends import CudaGraphsBackend
    from eqprop.solvers import SOLVERS
    model = MODELS[model_name]().to(CUDA).double()
    x, target = (t.to(CUDA).double() for t in batch(model))
    clamped = model.clamp(x)
    runner = CudaGraphsBackend().runner(SOLVERS[name].sweep)
    options = {} if name == "fixed" else {"tol": 1e-7, "check_every": 5}
    with torch.no_grad():
        for beta in (0.0, 0.3):
            eager, eager_stats = build_solver(name, **options)(model, clamped, model.init_state(x), 200, beta, target)
            graphed, stats = build_solver(name, runner, **options)(model, clamped, model.init_state(x), 200, beta,
                                                                  target)
            assert stats.steps == eager_stats.steps
            assert relative(graphed, eager) < 1e-12
    assert len(runner._graphs) > 0
