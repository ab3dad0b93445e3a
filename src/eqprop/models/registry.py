"""Model kinds by name: each with its configuration section (a pydantic schema) and its builder.

``model.kind`` of a configuration names a registered kind; the rest of the
``model`` section is validated by that kind's schema, and the builder makes the
network from it. The built-in ``mlp`` and ``cnn`` are registered by
:mod:`eqprop.build`; a user registers their own from a plugin module
(``plugins: [mypkg.models]`` in the configuration)::

    class LateralConfig(eqprop.ModelSection):
        kind: Literal["lateral"] = "lateral"
        hidden: int = 256

    @eqprop.register_model("lateral", LateralConfig)
    def build_lateral(section: LateralConfig, context: eqprop.ModelContext) -> Lateral:
        torch.manual_seed(context.seed)
        return Lateral(section.hidden)

The kind then trains, resumes, evaluates and runs the GDU check from the
command line like the built-in ones.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..config import ModelSection
from ..registration import same_definition
from .base import EnergyModel
from .products import DenseProducts


@dataclass(frozen=True)
class ModelContext:
    """What a builder gets besides its own section.

    ``generator`` (CPU, seeded from the run's seed) should draw every initial weight, so a seed
    gives one network; ``seed`` is that seed, for code that seeds its own way. ``products``: a
    backend's dense products for fully connected layers (None: PyTorch's), and
    ``dropout_generator`` the stream of a model's random masks (on the run's device).
    """

    generator: torch.Generator
    seed: int
    products: DenseProducts | None = None
    dropout_generator: torch.Generator | None = None


Builder = Callable[[Any, ModelContext], EnergyModel]


@dataclass(frozen=True)
class ModelKind:
    """A registered kind: its schema, its builder, and whether it reads flattened inputs
    (``[B, features]``, fully connected) or images (``[B, C, H, W]``)."""

    name: str
    schema: type[ModelSection]
    build: Builder
    flat_input: bool


MODEL_KINDS: dict[str, ModelKind] = {}
B = TypeVar("B", bound=Builder)


def register_model(kind: str, schema: type[ModelSection], *, flat_input: bool = True) -> Callable[[B], B]:
    """Decorator: register ``builder(section, context) -> EnergyModel`` as model kind ``kind``
    with configuration schema ``schema`` (a subclass of :class:`~eqprop.config.ModelSection`).
    ``flat_input``: the data loader hands it ``[B, features]`` (True) or ``[B, C, H, W]``."""
    if not (isinstance(schema, type) and issubclass(schema, ModelSection)):
        raise TypeError(f"model kind {kind!r}: its schema must subclass eqprop.ModelSection")
    if kind in MODEL_KINDS and not same_definition(MODEL_KINDS[kind].schema, schema):
        raise ValueError(f"model kind {kind!r} is already registered")

    def add(builder: B) -> B:
        MODEL_KINDS[kind] = ModelKind(kind, schema, builder, flat_input)
        return builder
    return add


def model_kind(name: str) -> ModelKind:
    """The kind registered as ``name``; a ValueError lists the registered ones."""
    importlib.import_module("eqprop.build")  # registers the built-in kinds
    try:
        return MODEL_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown model kind {name!r}; choose one of {', '.join(sorted(MODEL_KINDS))} "
                         "(a kind of your own: name the module that registers it in plugins)") from None
