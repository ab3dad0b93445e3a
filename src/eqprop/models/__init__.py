"""Convergent RNN models: the built-in closed-form networks, and the bases of a user's own
(:class:`PhiModel` by its Φ, :class:`FieldModel` by its vector field)."""
from .base import Clamped, EnergyModel, State, is_free
from .custom import FieldModel, PhiModel
from .mlp import PMLP

__all__ = ["Clamped", "EnergyModel", "FieldModel", "PMLP", "PhiModel", "State", "is_free"]
