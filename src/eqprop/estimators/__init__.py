"""Gradient estimators, one small module each, selected by name from ``ESTIMATORS``.

EP (need a primitive Φ): ``one_sided``, ``random_sign``, ``symmetric``, ``c_ep``.
Vector field (any model): ``vf``, ``symmetric_vf``, ``kp_vf``, ``c_vf``.
Baseline: ``bptt``.
"""
from .base import ESTIMATORS, Estimate, Estimator, Phases, build_estimator, estimator_class, register
from .bptt import BPTT
from .continual import ContinualEP, ContinualVF
from .kp_vf import KPVF
from .one_sided import OneSidedEP
from .random_sign import RandomSignEP
from .symmetric import SymmetricEP
from .symmetric_vf import SymmetricVF
from .vf import VectorFieldEstimator

__all__ = ["BPTT", "ContinualEP", "ContinualVF", "ESTIMATORS", "Estimate", "Estimator", "KPVF", "OneSidedEP",
           "Phases", "RandomSignEP", "SymmetricEP", "SymmetricVF", "VectorFieldEstimator", "build_estimator",
           "estimator_class", "register"]
