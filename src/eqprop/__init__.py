"""eqprop: Equilibrium Propagation for convergent recurrent networks, in PyTorch.

The pieces, each in one obvious place:

- models (``eqprop.models``): the networks, their primitive Φ and closed-form step;
- heads (``eqprop.heads``): losses and how they nudge the last layer;
- dynamics (``eqprop.dynamics``): running a phase;
- solvers (``eqprop.solvers``): reaching a phase's steady state (fixed steps, tolerance, ...);
- estimators (``eqprop.estimators``): one module per gradient estimator;
- training (``eqprop.training``): the epoch loop, evaluation, checkpoints;
- configuration, presets, data and the command line wire them together.
"""
from .activations import make_activation, register_activation
from .config import ConfigError, ModelSection, RunConfig, validate_config
from .data import ArrayDataset, BatchLoader, register_dataset
from .dynamics import record_phase, run_phase
from .estimators import ESTIMATORS, Estimate, Estimator, Phases, build_estimator, register
from .models import EnergyModel, FieldModel, PhiModel, PMLP
from .models.cnn import PCNN
from .models.registry import ModelContext, register_model
from .presets import load_preset, preset_names
from .solvers import SolverStats, build_solver, register_solver

from ._version import __version__

__all__ = ["__version__", "ArrayDataset", "BatchLoader", "ConfigError", "ESTIMATORS", "EnergyModel", "Estimate", "Estimator",
           "FieldModel", "ModelContext", "ModelSection", "PCNN", "PMLP", "Phases", "PhiModel", "RunConfig",
           "SolverStats", "build_estimator", "build_solver", "load_preset", "make_activation", "preset_names",
           "record_phase", "register", "register_activation", "register_dataset", "register_model",
           "register_solver", "run_phase", "validate_config"]
