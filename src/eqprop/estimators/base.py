"""The estimator interface: which phases run, and how their states become a gradient.

An estimator's :meth:`Estimator.estimate` returns ``∇̂``, the estimate of
``-∂L/∂θ`` (the direction the weights should move), for every trainable
parameter of the model in ``model.trainable_parameters()`` order;
:meth:`Estimator.fill_grads` stores ``p.grad = -∇̂`` so any ``torch.optim``
optimizer applies it. Register a new estimator with :func:`register`.
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, TypeVar

import torch
from pydantic import BaseModel
from torch import Tensor

from ..models.base import Clamped, EnergyModel, State
from ..solvers import Solver, SolverStats, build_solver
from ..registration import add_class, registered_class
from ..targets import one_hot_targets


@dataclass(frozen=True)
class Phases:
    """How long each phase may run, how hard the nudged phases pull, and how each phase is solved.

    ``t1`` and ``t2`` are the papers' step counts; with a solver that stops at a
    tolerance they are the caps. ``solver`` runs the free phase and
    ``nudged_solver`` the nudged phases (None: the ``fixed`` solver, the papers'
    plain T steps). Continual estimators move the weights at every nudged step,
    so their nudged phase always runs its T2 steps.
    """

    t1: int          # free-phase steps (the cap)
    t2: int          # nudged-phase steps K (the cap)
    beta: float      # nudging strength
    solver: Solver | None = field(default=None, compare=False)
    nudged_solver: Solver | None = field(default=None, compare=False)

    def free_solver(self) -> Solver:
        """The free phase's solver."""
        return self.solver if self.solver is not None else _FIXED

    def nudge_solver(self) -> Solver:
        """The nudged phases' solver."""
        return self.nudged_solver if self.nudged_solver is not None else _FIXED


@dataclass
class Estimate:
    """An estimator's result for one mini-batch.

    ``direction`` holds ∇̂ ≈ -∂L/∂θ per trainable parameter; ``free_state`` is
    the free steady state s*, from which the prediction and loss are read;
    ``free_stats`` and ``nudged_stats`` say how the phases were solved (steps,
    residuals; the symmetric phases run as one doubled batch and report once).
    """

    direction: list[Tensor]
    free_state: State
    free_stats: SolverStats | None = None
    nudged_stats: SolverStats | None = None


class Estimator(ABC):
    """Base class of gradient estimators; subclasses define :meth:`estimate`."""

    name: ClassVar[str]
    #: fields of the ``estimator`` configuration section passed to the constructor as keywords
    config_fields: ClassVar[tuple[str, ...]] = ()
    #: an estimator's own settings: a pydantic model whose fields the configuration gives as
    #: ``estimator.options`` (validated against it, passed to the constructor as keywords)
    options_schema: ClassVar[type[BaseModel] | None] = None
    #: which models it can train: "energy" (needs Φ), "vector_field" (needs B), or "any"
    models: ClassVar[str] = "energy"
    #: True if :meth:`train_step` moves the weights itself (plain SGD steps, no optimizer.step())
    moves_weights: ClassVar[bool] = False

    def __init__(self, phases: Phases, generator: torch.Generator | None = None) -> None:
        self.phases = phases
        self.generator = generator

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Every subclass's own :meth:`estimate` and :meth:`train_step` also take integer class
        labels: they are encoded as one-hot rows before it runs, so an estimator (a user's too)
        only ever sees one-hot targets."""
        super().__init_subclass__(**kwargs)
        for name in ("estimate", "train_step"):
            own = cls.__dict__.get(name)
            if own is not None and not getattr(own, "__isabstractmethod__", False):
                setattr(cls, name, _accepting_labels(own))

    @abstractmethod
    def estimate(self, model: EnergyModel, x: Tensor, target: Tensor, start: State | None = None) -> Estimate:
        """Run the phases on batch ``x`` with ``target`` (one-hot rows ``[B, classes]`` or integer
        labels ``[B]``) and return ∇̂. The free phase starts from ``start`` (None: the model's initial
        state; a warm start gives each sample's last steady state)."""

    def compile(self, **options: object) -> None:
        """Replace :meth:`estimate` by its ``torch.compile`` d version (phases traced into
        fused kernels; the first batch of each shape pays the compile time)."""
        self.estimate = torch.compile(self.estimate, **options)  # type: ignore[method-assign]

    def fill_grads(self, model: EnergyModel, x: Tensor, target: Tensor, ascent: bool = False,
                   start: State | None = None) -> Estimate:
        """Estimate, then set ``p.grad = -∇̂`` on every trainable parameter (``target``: one-hot rows
        or integer labels).

        With ``ascent``, ``p.grad = ∇̂`` instead, for an optimizer built with
        ``maximize=True``: it then takes the same step without a negation pass
        over every gradient (where its layout fits the parameter, ``p.grad`` is
        the direction tensor itself).
        """
        result = self.estimate(model, x, target) if start is None else self.estimate(model, x, target, start)
        for p, d in zip(model.trainable_parameters(), result.direction):
            if d.requires_grad:  # an estimator that ran its phases with autograd on (a user's, say)
                d = d.detach()
            if ascent and d.dtype == p.dtype and d.shape == p.shape and d.stride() == p.stride():
                p.grad = d  # nothing to copy
                continue
            if p.grad is None or p.grad.shape != p.shape:
                # the parameter's dtype and memory format (channels-last): fused optimizers need both
                p.grad = torch.empty_like(p)
            if ascent:  # phases run under autocast, or a gradient computed in another memory format
                p.grad.copy_(d)
            elif p.grad.dtype == d.dtype and p.grad.stride() == d.stride():
                torch.neg(d, out=p.grad)  # reuse the buffer: no fresh allocation per batch
            else:
                p.grad.copy_(d).neg_()
        return result

    def train_step(self, model: EnergyModel, x: Tensor, target: Tensor,
                   optimizer: torch.optim.Optimizer, start: State | None = None) -> Estimate:
        """One training step on a batch: fill the gradients, let ``optimizer`` apply them.

        An optimizer whose every group has ``maximize=True`` (the trainer builds
        them so) gets ``p.grad = ∇̂``, any other ``p.grad = -∇̂``: the same step.
        Estimators that move the weights themselves while the phases run
        (continual EP) override this and use the optimizer's per-layer rates.
        """
        ascent = all(group.get("maximize", False) for group in optimizer.param_groups)
        result = self.fill_grads(model, x, target, ascent, start)
        optimizer.step()
        return result

    # -- the phases shared by the EP estimators --------------------------------
    def free_phase(self, model: EnergyModel, clamped: Clamped,
                   start: State | None = None) -> tuple[State, SolverStats]:
        """The free phase from ``start`` (None: the model's initial state): at most T1 steps at β = 0."""
        start = model.init_state(clamped.x) if start is None else start
        return self.phases.free_solver()(model, clamped, start, self.phases.t1)

    def nudged_phase(self, model: EnergyModel, clamped: Clamped, free: State, beta: float,
                     target: Tensor) -> tuple[State, SolverStats]:
        """A nudged phase at ``beta`` from the free steady state: at most T2 steps."""
        return self.phases.nudge_solver()(model, clamped, free, self.phases.t2, beta, target)

    def symmetric_phases(self, model: EnergyModel, clamped: Clamped, free: State,
                         target: Tensor) -> tuple[State, State, SolverStats]:
        """The +β and -β nudged phases, both from s*. They are independent, so they run
        side by side as one batch of 2B samples with a per-sample β: half the steps,
        each on a larger batch."""
        beta, batch = self.phases.beta, clamped.x.shape[0]
        signs = torch.ones(2 * batch, 1, dtype=clamped.x.dtype, device=clamped.x.device)
        signs[batch:] = -1.0
        both, stats = self.phases.nudge_solver()(model, clamped.repeat_batch(2), [torch.cat([s, s]) for s in free],
                                                 self.phases.t2, signs * beta, torch.cat([target, target]))
        return [s[:batch] for s in both], [s[batch:] for s in both], stats


def _accepting_labels(method: Callable[..., Estimate]) -> Callable[..., Estimate]:
    """``method(self, model, x, target, ...)`` with its target passed through
    :func:`~eqprop.targets.one_hot_targets` (a floating target of x's dtype passes unchanged)."""
    @functools.wraps(method)
    def wrapped(self: Estimator, model: EnergyModel, x: Tensor, target: Tensor, *args: object,
                **kwargs: object) -> Estimate:
        if not (target.is_floating_point() and target.dtype == x.dtype):
            target = one_hot_targets(target, model.head.classes, x.dtype)
        return method(self, model, x, target, *args, **kwargs)
    return wrapped


def head_difference(model: EnergyModel, target: Tensor, first: tuple[State, float],
                    second: tuple[State, float]) -> list[Tensor]:
    """The head's part of an EP estimate: ``(∂(-β2 ℓ)/∂θ(s2) - ∂(-β1 ℓ)/∂θ(s1)) / (β2 - β1)``
    (empty for heads without parameters)."""
    (s1, b1), (s2, b2) = first, second
    head = [torch.zeros_like(p) for p in model.head.parameters()]
    for state, beta, sign in ((s2, b2, 1.0), (s1, b1, -1.0)):
        if beta != 0.0:
            for total, g in zip(head, model.head.param_grads(state[-1], target, beta)):
                total.add_(g, alpha=sign)
    return [h.mul_(1.0 / (b2 - b1)) for h in head]


def ep_difference(model: EnergyModel, clamped: Clamped, target: Tensor,
                  first: tuple[State, float], second: tuple[State, float]) -> list[Tensor]:
    """``(G_{β2}(s2) - G_{β1}(s1)) / (β2 - β1)``: the EP estimate from two phases.

    G_β = ∂Φ_β/∂θ with Φ_β = Φ - βℓ: Φ's parameters get ``G(s2) - G(s1)``, the
    head's parameters (if any) the difference of their ``-βℓ`` gradients.
    """
    (s1, b1), (s2, b2) = first, second
    grads = model.param_grads_difference(clamped, s2, s1, 1.0 / (b2 - b1))
    return grads + head_difference(model, target, first, second)


_FIXED = build_solver("fixed")

ESTIMATORS: dict[str, type[Estimator]] = {}
E = TypeVar("E", bound=type[Estimator])


def register(name: str) -> Callable[[E], E]:
    """Class decorator: make an estimator available by ``name`` in configs (a name taken by another
    estimator is refused: a built-in keeps its meaning)."""
    def add(cls: E) -> E:
        return add_class(ESTIMATORS, "estimator", name, cls)
    return add


def estimator_class(name: str) -> type[Estimator]:
    """The estimator class registered as ``name``."""
    return registered_class(ESTIMATORS, "estimator", name)


def build_estimator(name: str, phases: Phases, generator: torch.Generator | None = None,
                    **options: object) -> Estimator:
    """Instantiate the estimator registered as ``name`` with its own ``options``."""
    return estimator_class(name)(phases, generator, **options)
