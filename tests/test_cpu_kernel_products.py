"""The C kernel's dense products (a fully connected model's drive and weight gradients) equal
PyTorch's, whatever the shapes and the thread count, and step aside where they cannot apply."""
from __future__ import annotations

import pytest
import torch

from eqprop.config import validate_config
from eqprop.cpu_kernels import KernelPhases, KernelProducts, load_kernel
from eqprop.models import PMLP
from eqprop.models.products import DenseProducts
from eqprop.presets import load_preset
from eqprop.build import build_backend, build_model

from conftest import require_c_compiler

TORCH = DenseProducts()


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    require_c_compiler()
    for dtype in (torch.float32, torch.float64):
        load_kernel(dtype)


def kernel_products(threads: int) -> KernelProducts:
    """Products that fail instead of falling back where the kernel cannot be built."""
    return KernelProducts(load_kernel, threads)


def operands(batch: int, width: int, inputs: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype)
            for shape in ((batch, inputs), (width, inputs), (width,), (batch, width))]


# (batch, width, inputs): the presets' shapes, odd ones, and ones smaller than a vector or a panel
SHAPES = [(50, 512, 784), (100, 10, 512), (57, 13, 49), (1, 1, 1), (3, 2, 7), (9, 130, 300), (17, 5, 8)]


@pytest.mark.parametrize("batch,width,inputs", SHAPES)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_products_equal_pytorch(batch, width, inputs, dtype, tolerance, threads):
    x, weight, bias, left = operands(batch, width, inputs, dtype)
    products = kernel_products(threads)
    scale = max(1.0, inputs ** 0.5)  # the sums' size: their rounding grows with it
    drive = products.linear(x, weight, bias)
    assert drive.shape == (batch, width) and drive.dtype == dtype
    assert float((drive - TORCH.linear(x, weight, bias)).abs().max()) < tolerance * scale
    gradient = products.outer(left, x, -0.37)
    assert gradient.shape == (width, inputs) and gradient.dtype == dtype
    assert float((gradient - TORCH.outer(left, x, -0.37)).abs().max()) < tolerance * max(1.0, batch ** 0.5)


def test_results_do_not_depend_on_the_thread_count():
    x, weight, bias, left = operands(50, 77, 300, torch.float32)
    reference = kernel_products(1)
    drive, gradient = reference.linear(x, weight, bias), reference.outer(left, x, 0.5)
    for threads in (2, 3, 5, 16):
        products = kernel_products(threads)
        assert torch.equal(products.linear(x, weight, bias), drive)
        assert torch.equal(products.outer(left, x, 0.5), gradient)


def test_strided_operands_are_read_as_pytorch_reads_them():
    x, weight, bias, left = operands(20, 30, 40, torch.float64)
    products = kernel_products(2)
    x_t = x.t().contiguous().t()  # the same values, column-major
    weight_view = torch.cat([weight, weight], dim=1)[:, ::2]  # every other column: not contiguous
    assert torch.allclose(products.linear(x_t, weight_view, bias), TORCH.linear(x_t, weight_view, bias),
                          atol=1e-12, rtol=0)
    assert torch.allclose(products.outer(left.t().contiguous().t(), x_t, 2.0), TORCH.outer(left, x, 2.0),
                          atol=1e-12, rtol=0)


def test_nan_and_inf_propagate_as_in_pytorch():
    x, weight, bias, left = operands(10, 12, 20, torch.float64)
    x[3, 5] = float("nan")
    weight[7, 2] = float("inf")
    left[4, 1] = float("-inf")
    products = kernel_products(2)
    for ours, theirs in ((products.linear(x, weight, bias), TORCH.linear(x, weight, bias)),
                         (products.outer(left, x, 1.0), TORCH.outer(left, x, 1.0))):
        assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        finite = torch.isfinite(theirs)
        assert torch.allclose(ours[finite], theirs[finite], atol=1e-12, rtol=0)


def test_pytorch_computes_what_the_kernel_cannot():
    products = kernel_products(2)
    x, weight, bias, left = operands(8, 6, 5, torch.float32)
    weight.requires_grad_(True)
    drive = products.linear(x, weight, bias)  # autograd through the product
    assert drive.grad_fn is not None
    drive.sum().backward()
    assert weight.grad is not None
    with torch.no_grad():
        assert products.linear(x, weight, bias).grad_fn is None  # no graph to record: the kernel
    half = [t.to(torch.bfloat16) for t in (x, weight.detach(), bias)]
    assert products.linear(*half).dtype == torch.bfloat16
    with pytest.raises(RuntimeError):  # mixed types: PyTorch's own error
        products.outer(left.double(), x, 1.0)
    with pytest.raises(RuntimeError):  # shapes that do not fit: PyTorch's own error
        products.linear(x, weight.detach()[:, :3], bias)


def test_products_without_a_kernel_are_pytorch_s():
    x, weight, bias, left = operands(8, 6, 5, torch.float32)
    products = KernelProducts(lambda dtype: None, 2)
    assert torch.equal(products.linear(x, weight, bias), TORCH.linear(x, weight, bias))
    assert torch.equal(products.outer(left, x, 0.5), TORCH.outer(left, x, 0.5))


@pytest.mark.parametrize("kernels", [True, False])
def test_the_trainer_gives_fully_connected_models_the_kernel_s_products(kernels):
    data = load_preset("demo")
    data["train"].update(cpu_kernels=kernels, device="cpu")
    config = validate_config(data)
    backend = build_backend(config, torch.device("cpu"))
    model = build_model(config, backend=backend)
    assert isinstance(backend.runner("synchronous"), KernelPhases) == kernels
    assert isinstance(model.products, KernelProducts) == kernels
    assert type(PMLP([4, 3]).products) is DenseProducts  # other models keep PyTorch's


def test_inputs_zero_in_every_sample_are_skipped_without_changing_the_drive():
    x, weight, bias, _ = operands(20, 30, 64, torch.float64)
    x[:, 10:30] = 0.0   # zero in every sample: skipped
    x[:5, 40] = 0.0     # zero in some samples only: kept
    x[:, 50] = -0.0
    products = kernel_products(2)
    assert torch.allclose(products.linear(x, weight, bias), TORCH.linear(x, weight, bias), atol=1e-12, rtol=0)
    x[:, :] = 0.0
    assert torch.equal(products.linear(x, weight, bias), bias.expand(20, 30))
    # the documented difference: an inf weight of a skipped input does not reach the drive
    x, weight, bias, _ = operands(20, 30, 64, torch.float64)
    x[:, 3] = 0.0
    weight[7, 3] = float("inf")
    assert torch.isnan(TORCH.linear(x, weight, bias)[:, 7]).all()
    assert torch.isfinite(products.linear(x, weight, bias)).all()


@pytest.mark.parametrize("batch,width,inputs", [(0, 5, 7), (3, 0, 7), (3, 5, 0), (0, 0, 0)])
def test_empty_products_have_pytorch_s_shapes_and_values(batch, width, inputs):
    x, weight, bias, left = operands(batch, width, inputs, torch.float32)
    products = kernel_products(2)
    assert torch.equal(products.linear(x, weight, bias), TORCH.linear(x, weight, bias))
    assert torch.equal(products.outer(left, x, 0.3), TORCH.outer(left, x, 0.3))
