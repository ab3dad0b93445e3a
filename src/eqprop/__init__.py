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
from .config import ConfigError, RunConfig, validate_config
from .dynamics import record_phase, run_phase
from .estimators import ESTIMATORS, Estimate, Estimator, Phases, build_estimator, register
from .models import EnergyModel, PMLP
from .models.cnn import PCNN
from .presets import load_preset, preset_names
from .solvers import SolverStats, build_solver

__version__ = "0.1.0"

__all__ = ["ConfigError", "ESTIMATORS", "EnergyModel", "Estimate", "Estimator", "PCNN", "PMLP", "Phases",
           "RunConfig", "SolverStats", "build_estimator", "build_solver", "load_preset", "preset_names",
           "record_phase", "register", "run_phase", "validate_config"]
