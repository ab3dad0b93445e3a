"""Solvers: how a phase reaches its steady state, one small module each, selected by name.

``fixed`` (the papers' T steps; the default), ``tolerance`` (plain iteration
stopped at a residual tolerance), ``alternating`` (even then odd layers, same
stopping rule), ``anderson`` (Anderson acceleration with a safeguard). Every
solver is called as ``solver(model, clamped, state, steps, beta=0.0,
target=None)`` and returns ``(state, stats)``; see :mod:`eqprop.solvers.base`.
"""
from .anderson import Anderson
from .base import SOLVERS, Solver, SolverStats, Sweep, build_solver, register_solver, solver_class, state_change
from .fixed import FixedSteps
from .tolerance import Alternating, Tolerance
from .warm_start import WarmStart

__all__ = ["Alternating", "Anderson", "FixedSteps", "SOLVERS", "Solver", "SolverStats", "Sweep", "Tolerance",
           "WarmStart", "build_solver", "register_solver", "solver_class", "state_change"]
