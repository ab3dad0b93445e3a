"""Continual EP's and VF's nudged phase in the C kernel moves the weights as the PyTorch loop does."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from eqprop.cpu_kernels import KernelProducts, load_kernel
from eqprop.cpu_kernels import continual as kernel_continual
from eqprop.estimators import continual
from eqprop.models import PMLP
from eqprop.models.vf import VFMLP

from conftest import require_c_compiler


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    require_c_compiler()
    for dtype in (torch.float32, torch.float64):
        load_kernel(dtype)


def phase(model, x, target, beta, lrs, rule, include, steps=7):
    """telescoped_first_layer from the free state of ``model`` on ``x``: the final state, the
    parameters after the phase and the totals."""
    with torch.no_grad():
        clamped = model.clamp(x)
        state = model.init_state(x)
        for _ in range(20):
            state = model.step(clamped, state)
        result = continual.telescoped_first_layer(model, clamped, state, beta, target, steps, lrs, rule, include)
    return result.state, [p.detach().clone() for p in model.trainable_parameters()], result.direction, result.clamped


def difference(a, b) -> float:
    """The largest difference of two lists of tensors, relative to each tensor's size where above 1."""
    return max(float((u - v).abs().max()) / max(1.0, float(v.abs().max())) for u, v in zip(a, b)
               for u, v in [(u.detach(), v.detach())])


CASES = [  # sizes, activation, nudge inside σ
    ([784, 64, 10], "scaled_sigmoid", False),        # the C-EP paper's 1h network, narrower
    ([40, 33, 17, 5], "hard_sigmoid", True),         # odd widths, two hidden layers
    ([30, 24, 19, 21, 10], "scaled_sigmoid", False), # three hidden layers
    ([12, 9], "half_hard_sigmoid", False),           # one layer: only the telescoped first layer moves
]


@pytest.mark.parametrize("sizes,activation,inside", CASES)
@pytest.mark.parametrize("rule", ["ep", "vf"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-11), (torch.float32, 1e-4)])
@pytest.mark.parametrize("beta,masked,threads,batch", [(0.5, False, 1, 13), (-0.35, True, 3, 13), (0.2, True, 1, 2)])
def test_the_kernel_moves_the_weights_as_the_pytorch_loop(sizes, activation, inside, rule, dtype, tolerance, beta,
                                                          masked, threads, batch, monkeypatch):
    """Random-sign β (negative), samples left out of the updates (settle_tol), several threads, a
    batch of 2, and one frozen parameter."""
    g = torch.Generator().manual_seed(4)
    make = VFMLP if rule == "vf" else PMLP
    extra = {"backward_init": "independent"} if rule == "vf" else {}
    reference = make(sizes, activation, "mse", inside, generator=g, **extra).to(dtype)
    in_kernel = copy.deepcopy(reference)
    in_kernel.products = KernelProducts(load_kernel, threads)
    x = torch.rand(batch, sizes[0], generator=g, dtype=dtype)
    target = F.one_hot(torch.randint(0, sizes[-1], (batch,), generator=g), sizes[-1]).to(dtype)
    include = torch.arange(batch) % 3 != 1 if masked else None   # the second of two left out
    lrs = [0.004 * (i + 1) for i in range(len(reference.trainable_parameters()))]
    lrs[-1] = 0.0   # a frozen parameter: its total still counts
    calls = []
    real = kernel_continual.continual_steps
    monkeypatch.setattr(continual, "continual_steps", lambda *a: calls.append(real(*a)) or calls[-1])
    fast = phase(in_kernel, x, target, beta, lrs, rule, include)
    assert calls and calls[0] is not None   # the kernel ran the phase
    monkeypatch.setattr(continual, "continual_steps", lambda *a: None)
    slow = phase(reference, x, target, beta, lrs, rule, include)
    for got, want in zip(fast[:3], slow[:3]):
        assert difference(got, want) < tolerance
    assert difference(fast[3].offsets, slow[3].offsets) < tolerance   # the clamped input it ends with
    moved = difference(slow[1], [p.detach() for p in make(sizes, activation, "mse", inside,
                                                                 generator=torch.Generator().manual_seed(4),
                                                                 **extra).to(dtype).trainable_parameters()])
    assert moved > 0 and moved > 10 * difference(fast[1], slow[1])   # the weights moved, far more than they differ


def test_the_kernel_steps_aside_where_it_does_not_apply():
    """A softmax readout has parameters the kernel does not move: PyTorch runs that phase."""
    model = PMLP([20, 16, 7], "scaled_sigmoid", "ce", True).double()
    model.products = KernelProducts(load_kernel, 1)
    x = torch.rand(4, 20, dtype=torch.float64)
    target = F.one_hot(torch.arange(4) % 7, 7).double()
    with torch.no_grad():
        clamped = model.clamp(x)
        state = model.init_state(x)
        lrs = [0.1] * len(model.trainable_parameters())
        totals = [torch.zeros_like(p) for p in model.trainable_parameters()]
        assert kernel_continual.continual_steps(model, clamped, state, 0.5, target, 3, lrs, "ep", None, None,
                                                totals) is None
        plain = PMLP([20, 16, 7], "scaled_sigmoid", "mse", True).double()
        assert kernel_continual.continual_steps(plain, plain.clamp(x), plain.init_state(x), 0.5,
                                                F.one_hot(torch.arange(4) % 7, 7).double(), 3,
                                                [0.1] * 4, "ep", None, None,
                                                [torch.zeros_like(p) for p in plain.trainable_parameters()]) is None


@pytest.mark.parametrize("preset", ["cep-1h", "cvf-1h"])
def test_a_training_run_on_the_kernel_takes_its_nudged_phases_there(preset, tmp_path, monkeypatch):
    from eqprop import validate_config
    from eqprop.presets import load_preset
    from eqprop.training.trainer import train
    data = load_preset(preset)
    data["data"] = {"dataset": "mnist-demo", "train_subset": 60, "test_subset": 20}
    data["dynamics"].update(t1=5, t2=3)
    data["train"].update(epochs=1, cpu_kernels=True, threads=1, cpu_kernel_threads=1)
    ran = []

    def spy(*args):
        result = kernel_continual.continual_steps(*args)
        ran.append(result is not None)
        return result

    monkeypatch.setattr(continual, "continual_steps", spy)
    train(validate_config(data), tmp_path, log=lambda _: None)
    assert len(ran) == 3 and all(ran)   # each of the 3 batches' nudged phases ran in the kernel
