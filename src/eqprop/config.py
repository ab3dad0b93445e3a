"""The typed, validated run configuration (pydantic), and how it is read and changed.

A run is fully described by a :class:`RunConfig`: presets are YAML files of
this schema, ``--config FILE.yaml`` reads one, ``--set a.b=value`` changes one
field. Unknown keys and out-of-range values are refused with a one-line
:class:`ConfigError` that names the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PositiveFloat, PositiveInt, SerializeAsAny,
                      ValidationError, model_validator)

from .activations import ACTIVATIONS
from .plugins import PluginError, load_plugins

NonNegativeFloat = Annotated[float, Field(ge=0.0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class ConfigError(ValueError):
    """A configuration that cannot be used; its message is one line naming the key."""


class Strict(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSection(Strict):
    """Base of every model kind's configuration section: ``kind`` names the registered kind
    (:func:`~eqprop.models.registry.register_model`); a kind's schema adds its own fields."""

    kind: str


class NetworkOptions(ModelSection):
    """Settings shared by the built-in networks: activation, loss, nudge, init, backward weights."""

    activation: str
    loss: Literal["mse", "ce"]
    nudge: Literal["inside", "outside"] = Field(
        "inside", description="add β(y - s) inside σ (Laborieux 2021) or after it (Ernoult 2020); mse only")
    init_scale: PositiveFloat = 1.0
    backward: Literal["tied", "separate"] = Field(
        "tied", description="tied: prototypical model (B = W^T); separate: vector-field model with its own B")
    backward_init: Literal["independent", "flipped"] = Field(
        "independent", description="separate B: own random init, or W^T with signs flipped at random")
    backward_angle: Annotated[float, Field(ge=0.0, le=180.0)] = Field(
        0.0, description="flipped: target angle Ψ in degrees (each sign flipped with probability (1 - cos Ψ)/2)")

    def _check_network(self, layers_in_dynamics: int) -> None:
        _check_activation(self.activation)
        if self.loss == "ce" and self.nudge == "outside":
            raise ValueError("nudge: the softmax readout nudges inside σ only (eq. 19); use nudge inside")
        if self.backward == "separate" and layers_in_dynamics < 2:
            raise ValueError("backward: separate backward weights need at least two layers in the dynamics "
                             "(the softmax readout is not one); add a hidden layer or use loss mse")


class MLPConfig(NetworkOptions):
    """A fully connected P-MLP: ``sizes`` = [input, hidden..., classes]."""

    kind: Literal["mlp"] = "mlp"
    sizes: list[PositiveInt] = Field(default_factory=lambda: [784, 512, 10], min_length=2)
    activation: str = "scaled_sigmoid"
    loss: Literal["mse", "ce"] = "mse"

    @model_validator(mode="after")
    def _check(self) -> "MLPConfig":
        if self.loss == "ce" and len(self.sizes) < 3:
            raise ValueError("sizes: the softmax readout (loss ce) needs at least one hidden layer")
        self._check_network(len(self.sizes) - (1 if self.loss == "mse" else 2))
        return self


class CNNConfig(NetworkOptions):
    """A P-CNN: conv layers (each followed by 2x2 max-pooling), then fully connected layers."""

    kind: Literal["cnn"] = "cnn"
    input_shape: list[PositiveInt] = Field(default_factory=lambda: [3, 32, 32], min_length=3, max_length=3)
    channels: list[PositiveInt] = Field(default_factory=lambda: [128, 256, 512, 512], min_length=1)
    kernels: list[PositiveInt] = Field(default_factory=lambda: [3, 3, 3, 3], min_length=1)
    strides: list[PositiveInt] = Field(default_factory=lambda: [1, 1, 1, 1], min_length=1)
    paddings: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [1, 1, 1, 0], min_length=1)
    fc: list[PositiveInt] = Field(default_factory=lambda: [10], min_length=1)
    activation: str = "half_hard_sigmoid"
    loss: Literal["mse", "ce"] = "ce"
    dropout: Fraction = 0.0

    @model_validator(mode="after")
    def _check(self) -> "CNNConfig":
        n = len(self.channels)
        for key in ("kernels", "strides", "paddings"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"{key}: needs one value per conv layer ({n}), got {len(getattr(self, key))}")
        self._check_network(n + len(self.fc) - (0 if self.loss == "mse" else 1))
        return self


def _check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: unknown {name!r}; choose one of {', '.join(ACTIVATIONS)}")


def _is_union_member(part: str) -> bool:
    """Whether a location part names a member of a union type (``literal['auto']``,
    ``constrained-int``) rather than a key."""
    return not (part.isidentifier() or part.isdigit())


def _first_problem(error: ValidationError, drop: tuple[str, ...] = ()) -> str:
    """The first problem of a validation error as ``key.path: message`` (``drop``: location parts
    that are not keys). A value that no member of a union accepts (``'auto'`` or an int, a number
    or a list) is reported by the member that took its type (a list's bad item), else as what each
    member would have needed."""
    problems = [([str(part) for part in e["loc"] if part not in drop],
                 "unknown key" if e["type"] == "extra_forbidden" else e["msg"]) for e in error.errors()]
    loc, message = problems[0]
    named = loc[:-1] if message == "unknown key" else loc   # an unknown key's last part is the key, whatever it reads
    tag = next((i for i, part in enumerate(named) if _is_union_member(part)), None)
    if tag is not None:
        alike = [(where, what) for where, what in problems
                 if where[:tag] == loc[:tag] and len(where) > tag and _is_union_member(where[tag])]
        inside = [(where, what) for where, what in alike if len(where) > tag + 1]
        if inside:
            where, message = inside[0]
            loc = where[:tag] + [part for part in where[tag:] if not _is_union_member(part)]
        else:
            stem = "Input should be "
            message = " or ".join([alike[0][1]] + [what.removeprefix(stem) if alike[0][1].startswith(stem)
                                                   else what for _, what in alike[1:]])
            loc = loc[:tag]
    message = message.removeprefix("Value error, ")
    field, sep, rest = message.partition(": ")
    if sep and field and not any(c.isspace() for c in field):  # a validator (or a nested section) naming its key
        loc.append(field)
        message = rest
    key = ".".join(loc)
    return f"{key}: {message}" if key else message


def _model_section(value: Any) -> Any:
    """A ``model`` section validated by the schema of its ``kind`` (a mapping without ``kind``
    is an MLP); a section already validated is kept."""
    if isinstance(value, ModelSection) or not isinstance(value, dict):
        return value
    from .models.registry import model_kind
    try:
        schema = model_kind(value.get("kind", "mlp")).schema
    except ValueError as error:
        raise ValueError(f"kind: {error}") from None
    try:
        return schema.model_validate(value)
    except ValidationError as error:
        problem = _first_problem(error)
        if problem.endswith(": unknown key"):   # often a key of another kind, left by --set model.kind=...
            problem += f" of model kind {value.get('kind', 'mlp')!r}"
        raise ValueError(problem) from None


ModelConfig = Annotated[SerializeAsAny[ModelSection], BeforeValidator(_model_section)]


class DataConfig(Strict):
    """Which dataset, how much of it, and how it is preprocessed."""

    dataset: str = Field("mnist", description="a registered dataset: mnist, cifar10, mnist-demo, npz (arrays of "
                                               "your own, see path), or one a plugin registers")
    path: str | None = Field(None, description="npz: the folder holding train.npz and test.npz (arrays x and y)")
    train_subset: PositiveInt | None = Field(None, description="use only the first N training samples")
    test_subset: PositiveInt | None = Field(None, description="use only the first N test samples")
    mean: list[float] | None = Field(None, description="per-channel mean subtracted after x/255")
    std: list[PositiveFloat] | None = Field(None, description="per-channel std divided by after x/255")
    augment: bool = Field(False, description="random crop (edge padding) and horizontal flip")
    crop_padding: Annotated[int, Field(ge=0)] = 4

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        from .data.registry import DATASETS
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: unknown {self.dataset!r}; choose one of {', '.join(DATASETS)} (a dataset "
                             "of your own: name the module that registers it in plugins)")
        entry = DATASETS[self.dataset]
        if entry.needs_path and self.path is None:
            raise ValueError(f"path: dataset {self.dataset} reads its files from a folder; set data.path")
        if not entry.needs_path and self.path is not None:
            raise ValueError(f"path: not used by dataset {self.dataset} (its files are under the data root)")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean: give std too (both or neither)")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise ValueError("std: needs one value per channel of mean")
        return self


class DynamicsConfig(Strict):
    """Phase lengths and nudging strength."""

    t1: PositiveInt = Field(30, description="free-phase steps")
    t2: PositiveInt = Field(10, description="nudged-phase steps (K)")
    beta: PositiveFloat = Field(0.1, description="nudging strength (> 0; estimators choose its sign)")


class EstimatorConfig(Strict):
    """Which gradient estimator, and its own options."""

    name: str = "symmetric"
    bptt_steps: PositiveInt | Literal["all"] | None = Field(
        None, description="BPTT only: steps to backpropagate through (default T2, 'all' = T1)")
    leak: NonNegativeFloat = Field(0.0, description="KP-VF only: weight leak λ pulling W and B^T together")
    random_sign: bool = Field(False, description="continual estimators: draw the sign of β per batch")
    options: dict[str, Any] = Field(default_factory=dict, description="the settings of an estimator registered "
                                                                      "with its own schema (options_schema)")

    @model_validator(mode="after")
    def _check(self) -> "EstimatorConfig":
        from .estimators import ESTIMATORS
        if self.name not in ESTIMATORS:
            raise ValueError(f"name: unknown estimator {self.name!r}; choose one of {', '.join(sorted(ESTIMATORS))}")
        return self


class SolverConfig(Strict):
    """How each phase reaches its steady state (``dynamics.t1``/``t2`` are the caps)."""

    name: str = Field("fixed", description="the free phase's solver: fixed (the papers' T steps), tolerance, "
                                           "alternating or anderson")
    nudged: str | None = Field(None, description="the nudged phases' solver (None: fixed when name is fixed, else "
                                                 "tolerance, which stops a converging nudged phase early and "
                                                 "runs a non-converging one exactly as fixed does); continual "
                                                 "estimators always run T2 nudged steps")
    tol: PositiveFloat = Field(1e-4, description="stop when every sample's max-norm change in one step is <= tol")
    check_every: PositiveInt | None = Field(
        None, description="look at the residual every N steps (one host-device synchronisation per look on "
                          "a GPU; None: every step where the C kernel runs the phases, which looks at no "
                          "cost, else every 10 steps)")
    memory: PositiveInt = Field(5, description="anderson: iterates kept per sample")
    regularization: NonNegativeFloat = Field(1e-8, description="anderson: λ relative to the mean squared residual")
    mixing: Annotated[float, Field(gt=0.0, le=1.0)] = Field(1.0, description="anderson: weight of the map values "
                                                                             "against the iterates")
    sweep: Literal["synchronous", "alternating"] = Field(
        "synchronous", description="anderson: the map it accelerates, one synchronous step or one alternating "
                                   "sweep (even then odd layers)")
    warm_start: bool = Field(False, description="training: a sample's free phase starts from its own steady state "
                                                "of the last epoch (kept in float16 on the run's device)")
    options: dict[str, Any] = Field(default_factory=dict, description="the settings of a solver registered with "
                                                                      "its own schema (options_schema), for solver.name")

    @model_validator(mode="after")
    def _check(self) -> "SolverConfig":
        from .solvers import SOLVERS
        for key in ("name", "nudged"):
            value = getattr(self, key)
            if value is not None and value not in SOLVERS:
                raise ValueError(f"{key}: unknown solver {value!r}; choose one of {', '.join(sorted(SOLVERS))}")
        used = {field for name in (self.name, self.nudged_name()) for field in SOLVERS[name].config_fields}
        validated_options(SOLVERS[self.name], self.options, f"solver {self.name}")
        for key, field in SolverConfig.model_fields.items():
            if key not in ("name", "nudged", "warm_start", "options") and key not in used \
                    and getattr(self, key) != field.default:
                raise ValueError(f"{key}: not used by solver {self.name}"
                                 + (f" nor {self.nudged_name()}" if self.nudged_name() != self.name else ""))
        return self

    def nudged_name(self) -> str:
        """The nudged phases' solver, the default resolved."""
        if self.nudged is not None:
            return self.nudged
        return "fixed" if self.name == "fixed" else "tolerance"

    def uses_fixed_steps(self) -> bool:
        """True when every phase runs the papers' fixed steps."""
        return self.name == "fixed" and self.nudged_name() == "fixed"


class OptimConfig(Strict):
    """Optimizer with one learning rate per layer (input first, readout last)."""

    name: Literal["sgd", "adam"] = "sgd"
    lr: PositiveFloat | list[PositiveFloat] = Field(
        default_factory=lambda: [0.08, 0.04], description="one learning rate per layer (input first, readout "
                                                         "last), or one number for every layer")
    frozen: list[str] = Field(
        default_factory=list, description="parameters held at their initial values, by name as in "
                                          "model.named_parameters() (e.g. layers.0.bias): left out of the "
                                          "optimizer, so no estimator moves them")
    momentum: Fraction = 0.0
    nesterov: bool = False
    weight_decay: NonNegativeFloat = Field(
        0.0, description="L2 weight decay λ (continual estimators: θ ← (1 - ηλ) θ once per batch, after the "
                         "nudged phase)")
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    fused: bool = Field(True, description="use PyTorch's fused optimizer kernels (one pass over all weights)")


class ScheduleConfig(Strict):
    """Learning-rate schedule, stepped once per epoch."""

    name: Literal["constant", "cosine"] = "constant"
    t_max: PositiveInt | None = Field(None, description="cosine: epochs to anneal over (default: all); constant after")
    eta_min: NonNegativeFloat = Field(0.0, description="cosine: final learning rate of every layer")


class TrainConfig(Strict):
    """Epochs, batches and the run's environment."""

    epochs: PositiveInt = 1
    batch_size: PositiveInt = 20
    test_batch_size: PositiveInt = 1000
    seed: Annotated[int, Field(ge=0, le=2**62)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Literal["auto"] | PositiveInt | None = Field(
        "auto", description="CPU threads for torch (auto: 1 beside the C kernel, which has its own, else the "
                            "cores other processes leave idle at the start; None: torch's default)")
    dtype: Literal["float32", "float64"] = "float32"
    tf32: bool = Field(True, description="CUDA only: allow TF32 matmuls and convolutions")
    channels_last: Literal["auto", True, False] = Field(
        "auto", description="conv models: keep weights and states channels-last (NHWC); auto: on the CPU "
                            "(where NCHW pooling is slow), not on CUDA (no gain once the phases are graphed)")
    compile: bool = Field(False, description="torch.compile the estimator's phases (one-time compile cost "
                                             "of tens of seconds; then fewer, fused kernels per step)")
    cuda_graphs: bool = Field(True, description="CUDA only: capture each phase once as a CUDA graph and "
                                                "replay it (one launch per phase instead of one per kernel; "
                                                "not combined with compile)")
    cpu_kernels: Literal["auto"] | bool = Field(
        "auto", description="CPU: run the phases of fully connected models (P-MLP or VF-MLP, squared error or "
                            "softmax readout, sigmoid or hard sigmoid) in eqprop's C kernel, built on first use "
                            "with the system's C compiler (other models, or no compiler: PyTorch); auto: time "
                            "a few training steps with and without it at the start, keep the faster, and write "
                            "the choice into the run's config.yaml")
    cpu_kernel_threads: Literal["auto"] | Annotated[int, Field(ge=1, le=64)] | None = Field(
        "auto", description="threads of the C kernel (at most 64), each taking a share of the batch (auto: the "
                            "cores other processes leave idle, measured before every epoch; None: every core "
                            "this process may use); results do not depend on it; PyTorch's own ops keep "
                            "train.threads")
    bf16_autocast: bool = Field(False, description="run the phases under bfloat16 autocast (faster on GPUs; "
                                                   "EP's finite differences lose precision)")
    angle_every: PositiveInt | None = Field(
        None, description="every N batches, log the angle between the estimate and BPTT's gradient (costly)")
    dist_timeout: PositiveFloat = Field(300.0, description="distributed runs: seconds a process waits for its "
                                                          "peers (the rendezvous, every collective) before the run "
                                                          "ends with one line")
    tensorboard: bool = Field(False, description="also write every epoch's numbers as TensorBoard scalars in "
                                                 "RUN/tensorboard (needs pip install 'eqprop[tensorboard]')")
    stop_at_chance: PositiveInt | None = Field(
        5, description="stop a run (exit status 1) whose training error stays within 3 points of chance level "
                       "for this many epochs in a row: it does not learn (None: never)")
    on_collapse: Literal["stop", "rollback", "continue"] = Field(
        "stop", description="what a run does in an epoch that gives NaN or inf, or a test error back at chance "
                            "level after it had learned: stop (checkpoint.pt keeps the epoch before), rollback "
                            "(back to the last good epoch with the learning rates times rollback_lr_factor, "
                            "then on), continue")
    rollback_lr_factor: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        0.5, description="on_collapse rollback: the learning rates are multiplied by this at each rollback")
    max_rollbacks: Annotated[int, Field(ge=1, le=100)] = Field(
        3, description="on_collapse rollback: after this many rollbacks, a collapse stops the run")


class RunConfig(Strict):
    """Everything that defines a training run."""

    name: str = "custom"
    description: str = ""
    plugins: list[str] = Field(default_factory=list, description="modules imported before the rest is read "
                                                                 "(dotted names or .py files): they register "
                                                                 "models, datasets, estimators, solvers")
    model: ModelConfig = Field(default_factory=MLPConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    dynamics: DynamicsConfig = Field(default_factory=DynamicsConfig)
    solver: SolverConfig = Field(default_factory=SolverConfig)
    estimator: EstimatorConfig = Field(default_factory=EstimatorConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _check_estimator_fits_model(self) -> "RunConfig":
        from .estimators import ESTIMATORS
        needs = ESTIMATORS[self.estimator.name].models
        separate = getattr(self.model, "backward", None) == "separate"  # a plugin's kind: checked when built
        if needs == "energy" and separate:
            raise ValueError(f"estimator.name: {self.estimator.name} needs a primitive Φ, which a model with "
                             "backward: separate has not; use vf, symmetric_vf, kp_vf, c_vf or bptt")
        if needs == "vector_field" and isinstance(self.model, NetworkOptions) and not separate:
            raise ValueError(f"estimator.name: {self.estimator.name} needs a vector-field model "
                             "(model.backward: separate)")
        cls = ESTIMATORS[self.estimator.name]
        validated_options(cls, self.estimator.options, f"estimator {self.estimator.name}", "estimator.options")
        for field, default in (("bptt_steps", None), ("leak", 0.0), ("random_sign", False)):
            if getattr(self.estimator, field) != default and field not in cls.config_fields:
                raise ValueError(f"estimator.{field}: not used by estimator {self.estimator.name}")
        if cls.moves_weights:
            o = self.optim
            if o.name != "sgd" or o.momentum or o.nesterov:
                raise ValueError(f"optim: {self.estimator.name} moves the weights itself with plain SGD steps "
                                 "during the nudged phase; use name sgd, momentum 0 (weight_decay applies once "
                                 "per batch, after the phase)")
            if self.train.compile:
                raise ValueError(f"train.compile: {self.estimator.name} runs its nudged phase step by step "
                                 "(the weights move at every step); compile applies to the other estimators")
        if self.train.compile and not self.solver.uses_fixed_steps():
            raise ValueError("train.compile: compiles the fixed solver's phases only (the other solvers look at "
                             "the residual on the host); use solver.name fixed or turn compile off")
        return self

def validated_options(cls: type, options: dict[str, Any], what: str, key: str = "options") -> dict[str, Any]:
    """``options`` checked against ``cls.options_schema``, with its defaults filled in (what the
    constructor gets); a ValueError naming the key when there is no schema or a value is refused."""
    schema = getattr(cls, "options_schema", None)
    if schema is None:
        if options:
            raise ValueError(f"{key}: {what} takes no options")
        return options
    try:
        return schema.model_validate(options).model_dump(mode="json")
    except ValidationError as error:
        raise ValueError(f"{key}.{_first_problem(error)}") from None


# -- reading, changing, writing -------------------------------------------------
def validate_config(data: dict[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from plain data, or raise a one-line :class:`ConfigError`.
    The modules named in ``plugins`` are imported first (they register what the rest names)."""
    if not isinstance(data, dict):
        raise ConfigError("configuration must be a mapping of sections (model, data, dynamics, ...)")
    plugins = data.get("plugins") or []
    if not (isinstance(plugins, list) and all(isinstance(name, str) for name in plugins)):
        raise ConfigError("invalid configuration: plugins: a list of module names or .py files")
    try:
        load_plugins(plugins)
        return RunConfig.model_validate(data)
    except PluginError as error:
        raise ConfigError(f"invalid configuration: plugins: {error}") from None
    except ValidationError as error:
        raise ConfigError(f"invalid configuration: {_first_problem(error, ('function-before',))}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML configuration file into plain data (validated later)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text (a YAML file was expected)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def _glued_key(value: Any) -> str | None:
    """The first mapping key in ``value`` that holds a colon and no value (``{kind:cnn}``, which YAML
    reads as the key ``'kind:cnn'``), else None."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and ":" in key and item is None:
                return key
            found = _glued_key(item)
            if found is not None:
                return found
    if isinstance(value, list):
        return next((found for item in value if (found := _glued_key(item)) is not None), None)
    return None


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` (value parsed as YAML) to plain configuration data."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects dotted.key=value, got {assignment!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    glued = _glued_key(value)
    if glued is not None:
        raise ConfigError(f"--set {key}: {glued!r} reads as one key without a value; in YAML a colon needs a space "
                          "after it ({kind: cnn}, not {kind:cnn})")
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def config_to_yaml(config: RunConfig) -> str:
    """The resolved configuration as YAML text (what ``config.yaml`` of a run holds)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
