"""Wiring: turn a validated :class:`RunConfig` into the objects of a run.

The core (models, estimators, dynamics) knows nothing of configuration; this
module is the only place that maps configuration fields onto constructors, and
the place that checks what the schema alone cannot (a learning rate per layer,
a model that fits the data).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from .config import CNNConfig, ConfigError, MLPConfig, OptimConfig, RunConfig, ScheduleConfig
from .data import ArrayDataset, BatchLoader
from .estimators import Estimator, Phases, estimator_class
from .models import EnergyModel, PMLP
from .models.cnn import PCNN
from .models.vf import VFMLP
from .models.vf_cnn import VFCNN

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _backward_options(config: MLPConfig | CNNConfig) -> dict[str, object]:
    """Constructor keywords of the vector-field variant (empty for a prototypical model)."""
    if config.backward == "tied":
        return {}
    return {"backward_init": config.backward_init, "backward_angle": config.backward_angle}


def build_mlp(config: MLPConfig, generator: torch.Generator) -> EnergyModel:
    """A P-MLP, or its vector-field variant with ``backward: separate``."""
    cls = PMLP if config.backward == "tied" else VFMLP
    return cls(config.sizes, config.activation, config.loss, config.nudge == "inside",
               generator=generator, init_scale=config.init_scale, **_backward_options(config))


def build_cnn(config: CNNConfig, generator: torch.Generator) -> EnergyModel:
    """A P-CNN, or its vector-field variant with ``backward: separate``."""
    cls = PCNN if config.backward == "tied" else VFCNN
    return cls(config.input_shape, config.channels, config.kernels, config.strides, config.paddings,
               config.fc, activation=config.activation, loss=config.loss,
               nudge_inside=config.nudge == "inside", dropout=config.dropout,
               generator=generator, init_scale=config.init_scale, **_backward_options(config))


#: model kinds by the ``model.kind`` of the configuration
MODEL_BUILDERS: dict[str, Callable[..., EnergyModel]] = {"mlp": build_mlp, "cnn": build_cnn}


def build_model(config: RunConfig, seed: int | None = None) -> EnergyModel:
    """The network of ``config``, initialised from the run's seed (CPU, float32 until moved)."""
    generator = torch.Generator().manual_seed(config.train.seed if seed is None else seed)
    try:
        return MODEL_BUILDERS[config.model.kind](config.model, generator)
    except ValueError as error:
        raise ConfigError(f"model: {error}") from None


def check_model_fits_data(config: RunConfig, model: EnergyModel, data: ArrayDataset) -> None:
    """Refuse a model whose input or output size does not match the dataset."""
    sample_shape = list(data.x.shape[1:])
    if isinstance(config.model, MLPConfig):
        if config.model.sizes[0] != math.prod(sample_shape):
            raise ConfigError(f"model.sizes: the input size {config.model.sizes[0]} does not match "
                              f"{data.name} samples of {math.prod(sample_shape)} values")
        classes = config.model.sizes[-1]
    else:
        if config.model.input_shape != sample_shape:
            raise ConfigError(f"model.input_shape: {config.model.input_shape} does not match "
                              f"{data.name} samples of shape {sample_shape}")
        classes = config.model.fc[-1]
    if classes != data.num_classes:
        raise ConfigError(f"model: the output has {classes} units but {data.name} has {data.num_classes} classes")


def build_estimator_from(config: RunConfig, generator: torch.Generator) -> Estimator:
    """The configured estimator, drawing its random choices from ``generator``."""
    dyn = config.dynamics
    phases = Phases(dyn.t1, dyn.t2, dyn.beta)
    cls = estimator_class(config.estimator.name)
    options = {field: getattr(config.estimator, field) for field in cls.config_fields}
    return cls(phases, generator, **options)


def build_optimizer(config: OptimConfig, model: EnergyModel, ascend: bool = False) -> torch.optim.Optimizer:
    """SGD or Adam with one parameter group (and learning rate) per layer.

    With ``ascend`` it is built with ``maximize=True``, and
    :meth:`Estimator.train_step <eqprop.estimators.Estimator.train_step>` gives
    it the estimate ∇̂ itself as ``p.grad`` instead of a negated copy: the same
    step, without a pass over every gradient. The trainer asks for this except
    for the continual estimators, which make their own SGD steps.
    """
    groups = model.layer_parameters()
    if len(config.lr) != len(groups):
        raise ConfigError(f"optim.lr: the model has {len(groups)} layers (input first, readout last) "
                          f"but {len(config.lr)} learning rates were given")
    param_groups = [{"params": params, "lr": lr} for params, lr in zip(groups, config.lr)]
    if config.name == "sgd":
        if config.nesterov and config.momentum == 0:
            raise ConfigError("optim.nesterov: needs a momentum > 0")
        return torch.optim.SGD(param_groups, lr=config.lr[0], momentum=config.momentum,
                               nesterov=config.nesterov, weight_decay=config.weight_decay,
                               fused=config.fused or None, maximize=ascend)
    return torch.optim.Adam(param_groups, lr=config.lr[0], betas=config.betas, eps=config.eps,
                            weight_decay=config.weight_decay, fused=config.fused or None, maximize=ascend)


class _CosineFactor:
    """Cosine annealing from a group's base lr to ``eta_min`` over ``t_max`` epochs, then constant."""

    def __init__(self, base_lr: float, eta_min: float, t_max: int) -> None:
        self.floor = eta_min / base_lr
        self.t_max = t_max

    def __call__(self, epoch: int) -> float:
        progress = min(epoch, self.t_max) / self.t_max
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(config: ScheduleConfig, optimizer: torch.optim.Optimizer,
                    epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch learning-rate schedule (constant, or cosine as in the papers)."""
    if config.name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    t_max = config.t_max or epochs
    factors = [_CosineFactor(group["lr"], config.eta_min, t_max) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def subset(data: ArrayDataset, size: int | None) -> ArrayDataset:
    """The first ``size`` samples of ``data`` (all of it for None)."""
    if size is None or size >= len(data):
        return data
    return replace(data, x=data.x[:size], y=data.y[:size])


def build_loader(config: RunConfig, data: ArrayDataset, train: bool, device: torch.device,
                 generator: torch.Generator | None) -> BatchLoader:
    """A batch loader on ``device``: shuffled and (if configured) augmented for training."""
    d = config.data
    return BatchLoader(data, config.train.batch_size if train else config.train.test_batch_size,
                       shuffle=train, device=device, generator=generator, mean=d.mean, std=d.std,
                       augment=train and d.augment, crop_padding=d.crop_padding,
                       flatten=isinstance(config.model, MLPConfig), dtype=DTYPES[config.train.dtype])


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is a configuration error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was requested but no CUDA device is available")
    return torch.device(name)
