"""Convergent RNN models. ``build_model`` turns a model configuration into a network."""
from .base import Clamped, EnergyModel, State, is_free
from .mlp import PMLP

__all__ = ["Clamped", "EnergyModel", "PMLP", "State", "is_free"]
