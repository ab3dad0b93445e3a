"""Wiring: turn a validated :class:`RunConfig` into the objects of a run.

The core (models, estimators, solvers, dynamics) knows nothing of
configuration; this module is the only place that maps configuration fields
onto constructors, and the place that checks what the schema alone cannot (a
learning rate per layer, a model that fits the data, an estimator that can
train the model). :func:`build_run` assembles a whole run (model, backend,
solvers, estimator, data, optimizer, schedule); training, evaluation, the GDU
check and the benchmarks all build theirs with it.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import cpu_choice
from .backends import Backend, CpuKernelBackend, CudaGraphsBackend
from .cpu_kernels import kernel_runs_model
from .cpu_kernels.runner import available_cores, idle_cores
from .config import (CNNConfig, ConfigError, MLPConfig, OptimConfig, RunConfig, ScheduleConfig, SolverConfig,
                     validated_options)
from .data import ArrayDataset, BatchLoader, load_dataset, resolve_data_root
from .data.registry import dataset_entry
from .distributed import WORLD, World
from .estimators import Estimator, Phases, estimator_class
from .models import EnergyModel, PMLP
from .models.registry import ModelContext, model_kind, register_model
from .solvers import Solver, WarmStart, solver_class
from .models.cnn import PCNN
from .models.vf import VFMLP
from .models.vf_cnn import VFCNN

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _backward_options(config: MLPConfig | CNNConfig) -> dict[str, object]:
    """Constructor keywords of the vector-field variant (empty for a prototypical model)."""
    if config.backward == "tied":
        return {}
    return {"backward_init": config.backward_init, "backward_angle": config.backward_angle}


@register_model("mlp", MLPConfig, flat_input=True)
def build_mlp(config: MLPConfig, context: ModelContext) -> EnergyModel:
    """A P-MLP, or its vector-field variant with ``backward: separate``, computing its dense products
    with the context's (a backend's; None: PyTorch's). An MLP has no dropout."""
    cls = PMLP if config.backward == "tied" else VFMLP
    return cls(config.sizes, config.activation, config.loss, config.nudge == "inside",
               generator=context.generator, init_scale=config.init_scale, products=context.products,
               **_backward_options(config))


@register_model("cnn", CNNConfig, flat_input=False)
def build_cnn(config: CNNConfig, context: ModelContext) -> EnergyModel:
    """A P-CNN, or its vector-field variant with ``backward: separate``, drawing its dropout masks
    from the context's stream. Its products are PyTorch's convolutions."""
    cls = PCNN if config.backward == "tied" else VFCNN
    return cls(config.input_shape, config.channels, config.kernels, config.strides, config.paddings,
               config.fc, activation=config.activation, loss=config.loss,
               nudge_inside=config.nudge == "inside", dropout=config.dropout,
               generator=context.generator, init_scale=config.init_scale,
               dropout_generator=context.dropout_generator, **_backward_options(config))


def build_model(config: RunConfig, seed: int | None = None, backend: Backend | None = None,
                dropout_generator: torch.Generator | None = None) -> EnergyModel:
    """The network of ``config`` by its registered kind, initialised from the run's seed (CPU,
    float32 until moved), computing its products with ``backend``'s where it has any and drawing
    its dropout masks from ``dropout_generator``."""
    seed = config.train.seed if seed is None else seed
    context = ModelContext(torch.Generator().manual_seed(seed), seed,
                           backend.products if backend is not None else None, dropout_generator)
    kind = model_kind(config.model.kind)
    try:
        model = kind.build(config.model, context)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"model: {_first_line(error)}") from None
    if not isinstance(model, EnergyModel):
        raise ConfigError(f"model: the builder of kind {kind.name} returned a {type(model).__name__}, "
                          "not an eqprop EnergyModel")
    return model


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_model_fits_data(config: RunConfig, model: EnergyModel, data: ArrayDataset) -> None:
    """Refuse a model whose input or output size does not match the dataset: the built-in kinds by
    their sizes, any other kind by one free step on two samples."""
    sample_shape = list(data.x.shape[1:])
    if isinstance(config.model, MLPConfig) and config.model.sizes[0] != math.prod(sample_shape):
        raise ConfigError(f"model.sizes: the input size {config.model.sizes[0]} does not match "
                          f"{data.name} samples of {math.prod(sample_shape)} values")
    if isinstance(config.model, CNNConfig) and config.model.input_shape != sample_shape:
        raise ConfigError(f"model.input_shape: {config.model.input_shape} does not match "
                          f"{data.name} samples of shape {sample_shape}")
    classes = model.head.classes
    if classes != data.num_classes:
        raise ConfigError(f"model: the output has {classes} units but {data.name} has {data.num_classes} classes")
    if not isinstance(config.model, (MLPConfig, CNNConfig)):
        x = data.x[:2].float()
        x = x.flatten(1) if model_kind(config.model.kind).flat_input else x
        try:
            with torch.no_grad():
                model.logits(model.step(model.clamp(x), model.init_state(x)))
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            raise ConfigError(f"model: the {config.model.kind} model cannot take {data.name} samples of shape "
                              f"{list(x.shape[1:])}: {_first_line(error)}") from None


def build_estimator_from(config: RunConfig, generator: torch.Generator,
                         solvers: tuple[Solver, Solver] | None = None) -> Estimator:
    """The configured estimator, drawing its random choices from ``generator`` and solving its
    free and nudged phases with ``solvers`` (None: the papers' fixed steps)."""
    dyn = config.dynamics
    free, nudged = solvers if solvers is not None else (None, None)
    phases = Phases(dyn.t1, dyn.t2, dyn.beta, free, nudged)
    cls = estimator_class(config.estimator.name)
    options = {field: getattr(config.estimator, field) for field in cls.config_fields}
    own = validated_options(cls, config.estimator.options, f"estimator {cls.name}")
    return cls(phases, generator, **options, **own)


def build_optimizer(config: OptimConfig, model: EnergyModel, ascend: bool = False) -> torch.optim.Optimizer:
    """SGD or Adam with one parameter group (and learning rate) per layer.

    With ``ascend`` it is built with ``maximize=True``, and
    :meth:`Estimator.train_step <eqprop.estimators.Estimator.train_step>` gives
    it the estimate ∇̂ itself as ``p.grad`` instead of a negated copy: the same
    step, without a pass over every gradient. The trainer asks for this except
    for the continual estimators, which make their own SGD steps.
    """
    groups = model.layer_parameters()
    rates = [config.lr] * len(groups) if isinstance(config.lr, float) else config.lr
    if len(rates) != len(groups):
        raise ConfigError(f"optim.lr: the model has {len(groups)} layers (input first, readout last) "
                          f"but {len(rates)} learning rates were given (or give one number for all)")
    groups = _unfrozen(groups, config.frozen, model)
    param_groups = [{"params": params, "lr": lr} for params, lr in zip(groups, rates)]
    if config.name == "sgd":
        if config.nesterov and config.momentum == 0:
            raise ConfigError("optim.nesterov: needs a momentum > 0")
        return torch.optim.SGD(param_groups, lr=rates[0], momentum=config.momentum,
                               nesterov=config.nesterov, weight_decay=config.weight_decay,
                               fused=config.fused or None, maximize=ascend)
    return torch.optim.Adam(param_groups, lr=rates[0], betas=config.betas, eps=config.eps,
                            weight_decay=config.weight_decay, fused=config.fused or None, maximize=ascend)


def _unfrozen(groups: list[list[torch.nn.Parameter]], frozen: list[str],
              model: EnergyModel) -> list[list[torch.nn.Parameter]]:
    """``groups`` without the parameters named in ``optim.frozen`` (a group may end up empty: its
    place, and so every layer's learning rate, stays)."""
    if not frozen:
        return groups
    name_of = {id(p): name for name, p in model.named_parameters()}
    trainable = [name_of[id(p)] for params in groups for p in params]
    unknown = [name for name in frozen if name not in trainable]
    if unknown:
        raise ConfigError(f"optim.frozen: the model has no trainable parameter {', '.join(map(repr, unknown))}; "
                          f"it has {', '.join(trainable)}")
    return [[p for p in params if name_of[id(p)] not in frozen] for params in groups]


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
                 generator: torch.Generator | None, world: World = WORLD) -> BatchLoader:
    """A batch loader on ``device``: shuffled and (if configured) augmented for training; in a
    distributed run, this rank's share of every (global) batch."""
    d = config.data
    return BatchLoader(data, config.train.batch_size if train else config.train.test_batch_size,
                       shuffle=train, device=device, generator=generator, mean=d.mean, std=d.std,
                       augment=train and d.augment, crop_padding=d.crop_padding,
                       flatten=model_kind(config.model.kind).flat_input, dtype=DTYPES[config.train.dtype],
                       world=world)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is a configuration error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was requested but no CUDA device is available")
    return torch.device(name)


def configure_torch(config: RunConfig) -> torch.device:
    """Apply thread count (``auto`` resolved already: :func:`resolve_cpu_settings`) and CUDA math
    settings; return the run's device."""
    device = resolve_device(config.train.device)
    if isinstance(config.train.threads, int):
        torch.set_num_threads(config.train.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.train.tf32
        torch.backends.cudnn.allow_tf32 = config.train.tf32
    return device


def place_model(model: EnergyModel, config: RunConfig, device: torch.device) -> EnergyModel:
    """Move the model to the run's device, dtype and (conv models) memory layout."""
    model = model.to(device=device, dtype=DTYPES[config.train.dtype])
    channels_last = config.train.channels_last
    if channels_last == "auto":
        channels_last = device.type == "cpu"
    if channels_last and isinstance(config.model, CNNConfig):
        model = model.to(memory_format=torch.channels_last)
    return model


def resolve_cpu_settings(config: RunConfig, device: torch.device, world: World = WORLD) -> tuple[RunConfig, list[str]]:
    """``config`` with ``train.cpu_kernels`` and ``train.threads`` resolved where they are ``auto``
    (:mod:`eqprop.cpu_choice`), and a line saying what was measured and chosen. The processes of
    a distributed run on the CPU decide alike without timing: the kernel where it runs the model,
    the cores shared evenly among the processes of a machine."""
    if not cpu_choice.needs_choice(config):
        return config, []
    if world.distributed and device.type == "cpu":
        share = max(1, available_cores() // world.local_size)
        kernel = config.train.cpu_kernels if config.train.cpu_kernels != "auto" else \
            (not config.train.compile and kernel_runs_model(build_model(config)))
        threads = config.train.threads if config.train.threads != "auto" else (1 if kernel else share)
        train = config.train.model_copy(update={"cpu_kernels": kernel, "threads": threads, "cpu_kernel_threads":
                                                share if config.train.cpu_kernel_threads == "auto"
                                                else config.train.cpu_kernel_threads})
        return config.model_copy(update={"train": train}), []
    if device.type != "cpu":  # CUDA: no kernel; torch's threads feed the GPU
        threads = available_cores() if config.train.threads == "auto" else config.train.threads
        return cpu_choice.CpuSetting(False, threads).apply(config), []
    kernel_runs = not config.train.compile and kernel_runs_model(build_model(config))
    options = cpu_choice.settings(config, idle_cores(), kernel_runs)
    if len(options) == 1:
        return options[0].apply(config), []
    try:
        best, seconds = cpu_choice.choose(options, lambda setting: _training_step(setting.apply(config), device))
    except Exception:  # a run that cannot take a step: the build that follows says why, in one line
        return options[0].apply(config), []
    timings = ", ".join(f"{setting.describe(config)} {1000 * t:.2f} ms" for setting, t in seconds.items())
    return best.apply(config), [f"CPU setting (train.cpu_kernels auto), a training step of this model: {timings}; "
                                f"using {best.describe(config)}"]


def _training_step(config: RunConfig, device: torch.device) -> Callable[[], object]:
    """One training step's estimate of ``config``'s model on a random batch of the run's size, at
    most :data:`cpu_choice.TIMED_BATCH` (weights unchanged, the run's random streams untouched):
    what :func:`resolve_cpu_settings` times."""
    backend = build_backend(config, device)
    model = place_model(build_model(config, backend=backend), config, device)
    backend.prepare(model)
    in_kernel = isinstance(backend, CpuKernelBackend) and kernel_runs_model(model)
    solvers, _ = build_solvers(config, backend, CHECK_EVERY_IN_KERNEL if in_kernel else CHECK_EVERY)
    estimator = build_estimator_from(config, torch.Generator().manual_seed(0), solvers)
    generator = torch.Generator().manual_seed(0)
    dtype = DTYPES[config.train.dtype]
    batch = min(config.train.batch_size, cpu_choice.TIMED_BATCH)
    x = torch.rand(batch, model.sizes[0], generator=generator).to(device, dtype)
    labels = torch.randint(0, model.head.classes, (batch,), generator=generator)
    target = torch.eye(model.head.classes, dtype=dtype, device=device)[labels]
    return lambda: estimator.estimate(model, x, target)


def build_backend(config: RunConfig, device: torch.device) -> Backend:
    """What computes the steps: CUDA graphs on CUDA, eqprop's C kernel on the CPU (each where
    configured and the phases are not compiled), else PyTorch's eager steps."""
    if config.train.compile:
        return Backend()
    if config.train.cuda_graphs and device.type == "cuda":
        return CudaGraphsBackend()
    if config.train.cpu_kernels and device.type == "cpu":
        return CpuKernelBackend(config.train.cpu_kernel_threads)
    return Backend()


#: ``solver.check_every`` where the configuration leaves it open: every step where the C kernel
#: runs the phases (it looks at each sample's residual inside its own loop, at no cost), else every
#: 10 steps (a look is a few passes over the state, and on a GPU a synchronisation)
CHECK_EVERY_IN_KERNEL, CHECK_EVERY = 1, 10


def _solver_options(config: SolverConfig, name: str, check_every: int) -> dict[str, object]:
    """The ``solver`` section's options that solver ``name`` takes (``check_every`` given where
    the configuration leaves it open)."""
    options = {key: getattr(config, key) for key in solver_class(name).config_fields}
    if "check_every" in options and options["check_every"] is None:
        options["check_every"] = check_every
    return options | (validated_options(solver_class(name), config.options, f"solver {name}")
                      if name == config.name else {})


def build_solvers(config: RunConfig, backend: Backend,
                  check_every: int = CHECK_EVERY) -> tuple[tuple[Solver, Solver], list[str]]:
    """The free and nudged phases' solvers on ``backend``, and one line for each solver that the
    backend cannot run (it then runs in PyTorch). ``check_every``: where the configuration leaves
    it open."""
    section = config.solver
    notes: list[str] = []
    solvers = []
    for name in (section.name, section.nudged_name()):
        cls = solver_class(name)
        options = _solver_options(section, name, check_every)
        sweep = options.get("sweep", cls.sweep)
        if not backend.supports(sweep):
            note = (f"solver {name}: the {backend.name} backend runs synchronous steps only; "
                    f"its {sweep} sweeps run in PyTorch")
            if note not in notes:
                notes.append(note)
        try:
            solvers.append(cls(backend.runner(sweep), **options))
        except ValueError as error:
            raise ConfigError(f"solver: {error}") from None
    return (solvers[0], solvers[1]), notes


def check_estimator_fits_model(estimator: Estimator, model: EnergyModel) -> None:
    """Refuse, in one line, an estimator that cannot train ``model`` (what the model declares)."""
    needs = estimator.models
    if needs == "energy" and model.is_vector_field:
        raise ConfigError(f"estimator.name: {estimator.name} needs a primitive Φ, which {type(model).__name__} "
                          "(a vector-field model) has not")
    if needs == "vector_field" and not model.is_vector_field:
        raise ConfigError(f"estimator.name: {estimator.name} needs a vector-field model (separate backward "
                          f"weights); {type(model).__name__} is not one")


@dataclass
class Generators:
    """Every random stream of a run after initialisation, each seeded from the run's seed."""

    data: torch.Generator       # shuffling and augmentation (CPU)
    estimator: torch.Generator  # random sign of β and the like (CPU)
    model: torch.Generator      # dropout masks (on the model's device)

    @classmethod
    def seeded(cls, seed: int, device: torch.device, rank: int = 0) -> "Generators":
        """The run's streams; the data order and the estimator's draws are the same on every rank of
        a distributed run (the global batch's), the dropout masks are drawn per rank (each for its
        own share of the batch) from a seed of the run's seed and the rank."""
        model_seed = cls.model_seed(seed) + (1_000_003 * rank if rank else 0)
        return cls(torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 2),
                   torch.Generator(device=device).manual_seed(model_seed))

    @staticmethod
    def model_seed(seed: int, epoch: int = 0) -> int:
        """The seed of the model's (dropout) stream; a run moved to another device after
        ``epoch`` re-seeds it with this, since device generator states do not carry over."""
        return seed + 3 + epoch

    def state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).get_state() for name in ("data", "estimator", "model")}

    def restore(self, states: dict[str, torch.Tensor]) -> None:
        for name, state in states.items():
            getattr(self, name).set_state(state)


@dataclass
class Run:
    """Everything a run computes with, built from one configuration by :func:`build_run`.

    ``estimator`` solves its phases with ``solvers`` (free, nudged) on ``backend``;
    evaluation runs the free phase with the same free solver. ``optimizer``,
    ``scheduler`` and ``train_loader`` exist for training runs only, the loaders
    for runs built with data, ``warm_start`` for training runs with
    ``solver.warm_start``. ``notes``: the
    one-line messages about how the run was built (e.g. a solver the backend
    cannot run, which then runs in PyTorch).
    """

    config: RunConfig
    device: torch.device
    model: EnergyModel
    backend: Backend
    solvers: tuple[Solver, Solver]
    estimator: Estimator
    generators: Generators
    data_root: Path | None
    test_loader: BatchLoader | None = None
    train_loader: BatchLoader | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    warm_start: WarmStart | None = None
    notes: list[str] = field(default_factory=list)
    #: what computes the phases: "c_kernel", "cuda_graphs", "compiled" or "eager" (run.json says it)
    phases_run_in: str = "eager"


def _phases_run_in(config: RunConfig, backend: Backend, in_kernel: bool) -> str:
    if config.train.compile:
        return "compiled"
    if isinstance(backend, CudaGraphsBackend):
        return "cuda_graphs"
    return "c_kernel" if in_kernel else "eager"


def load_split(config: RunConfig, split: str, data_dir: str | Path | None, download: bool,
               size: int | None) -> tuple[ArrayDataset, Path | None]:
    """The configured dataset's ``split`` (its first ``size`` samples), and the data root it came from."""
    root = resolve_data_root(data_dir) if dataset_entry(config.data.dataset).location == "root" else None
    return subset(load_dataset(config.data.dataset, split, root, download, config.data.path), size), root


def check_distributed(config: RunConfig, world: World, estimator: Estimator) -> None:
    """Refuse, in one line, what a distributed run cannot do."""
    if not world.distributed:
        return
    if config.train.batch_size % world.size:
        raise ConfigError(f"train.batch_size: the global batch of {config.train.batch_size} does not split evenly "
                          f"across {world.size} processes")
    if estimator.moves_weights:
        raise ConfigError(f"estimator.name: {estimator.name} moves the weights at every step of the nudged phase "
                          "from the batch's mean update; across processes that would need an all-reduce per "
                          "step, which eqprop does not do: train it in one process")
    if config.solver.warm_start:
        raise ConfigError("solver.warm_start: keeps each sample's state on the process that saw it last; "
                          "a distributed run gives a sample to another process each epoch")


def build_run(config: RunConfig, *, data_dir: str | Path | None = None, download: bool = False,
              training: bool = True, test_subset: int | None = None, with_data: bool = True,
              optimize: bool = True, world: World = WORLD) -> Run:
    """Build the run ``config`` describes: device, backend, model, solvers, estimator, data, and for
    ``training`` the training data, the optimizer and the schedule. Every check that needs the built
    objects happens here, so a run that cannot work fails before any epoch with one line
    (:class:`ConfigError`). ``with_data`` False builds no loaders (benchmarks that feed their own
    batches); ``optimize`` False no optimizer (the GDU check reads training batches only). The run's
    ``config`` has ``auto`` CPU settings resolved (:func:`resolve_cpu_settings`). ``world``: this
    process's place in a distributed run (:mod:`eqprop.distributed`)."""
    config, cpu_notes = resolve_cpu_settings(config, resolve_device(config.train.device), world)
    device = configure_torch(config)
    test_data, root = (load_split(config, "test", data_dir, download, test_subset or config.data.test_subset)
                       if with_data else (None, None))
    backend = build_backend(config, device)
    generators = Generators.seeded(config.train.seed, device, world.rank)
    model = build_model(config, backend=backend, dropout_generator=generators.model)
    if test_data is not None:
        check_model_fits_data(config, model, test_data)
    model = place_model(model, config, device)
    backend.prepare(model)
    in_kernel = isinstance(backend, CpuKernelBackend) and kernel_runs_model(model)
    solvers, notes = build_solvers(config, backend, CHECK_EVERY_IN_KERNEL if in_kernel else CHECK_EVERY)
    estimator = build_estimator_from(config, generators.estimator, solvers)
    check_estimator_fits_model(estimator, model)
    check_distributed(config, world, estimator)
    if config.solver.warm_start and "start" not in inspect.signature(estimator.estimate).parameters:
        raise ConfigError(f"solver.warm_start: estimator {estimator.name} takes no start state "
                          "(its estimate has no start argument)")
    if config.train.compile:
        estimator.compile()
    run = Run(config, device, model, backend, solvers, estimator, generators, root, notes=cpu_notes + notes,
              phases_run_in=_phases_run_in(config, backend, in_kernel))
    if training and optimize:
        run.optimizer = build_optimizer(config.optim, model, ascend=not estimator.moves_weights)
        run.scheduler = build_scheduler(config.schedule, run.optimizer, config.train.epochs)
    if with_data:
        try:
            run.test_loader = build_loader(config, test_data, False, device, None, world)
            if training:
                train_data, _ = load_split(config, "train", data_dir, download, config.data.train_subset)
                run.train_loader = build_loader(config, train_data, True, device, generators.data, world)
                if config.solver.warm_start:
                    run.warm_start = WarmStart(len(train_data))
        except ValueError as error:
            if isinstance(error, ConfigError):
                raise
            raise ConfigError(f"data: {error}") from None
    return run
