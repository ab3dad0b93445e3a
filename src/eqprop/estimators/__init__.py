"""Gradient estimators, one small module each, selected by name from ``ESTIMATORS``."""
from .base import ESTIMATORS, Estimate, Estimator, Phases, build_estimator, estimator_class, register
from .bptt import BPTT
from .one_sided import OneSidedEP
from .random_sign import RandomSignEP
from .symmetric import SymmetricEP

__all__ = ["BPTT", "ESTIMATORS", "Estimate", "Estimator", "OneSidedEP", "Phases", "RandomSignEP",
           "SymmetricEP", "build_estimator", "estimator_class",
           "register"]
