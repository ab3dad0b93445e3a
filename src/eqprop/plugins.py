"""Plugins: the user modules a configuration names, imported before the rest of it is read.

A plugin registers what the configuration then names: a model kind
(:func:`~eqprop.models.registry.register_model`), a dataset
(:func:`~eqprop.data.registry.register_dataset`), an estimator
(:func:`~eqprop.estimators.register`), a solver
(:func:`~eqprop.solvers.register_solver`) or an activation
(:func:`~eqprop.activations.register_activation`). ``plugins`` lists dotted
module names (importable, or found in the current folder) or paths of ``.py``
files. The list is stored in the run's ``config.yaml`` and checkpoint, so
``--resume``, ``eval`` and ``gdu`` import the same modules again.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path


class PluginError(ImportError):
    """A plugin that cannot be imported; the message is one line."""


def load_plugins(names: list[str]) -> None:
    """Import every plugin of ``names`` once (a second load of the same name does nothing)."""
    for name in names:
        if name.endswith(".py"):
            _load_file(Path(name))
        else:
            _load_module(name)


def _load_module(name: str) -> None:
    if name in sys.modules:
        return
    here = str(Path.cwd())
    added = here not in sys.path
    if added:
        sys.path.append(here)  # a module beside the user, as `python -m` would find it
    try:
        importlib.import_module(name)
    except ImportError as error:
        raise PluginError(f"cannot import {name!r}: {error}") from None
    except Exception as error:  # the plugin's own code failed: say where, in one line
        raise PluginError(f"importing {name!r} failed: {type(error).__name__}: {error}") from None
    finally:
        if added:
            sys.path.remove(here)


def _load_file(path: Path) -> None:
    resolved = path.expanduser().resolve()
    if not resolved.is_file():
        where = ("" if path.expanduser().is_absolute()
                 else f" (relative paths are read from the current folder, {Path.cwd()})")
        raise PluginError(f"no plugin file {path}{where}")
    module_name = f"eqprop_plugin_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot load plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise PluginError(f"plugin file {path} failed: {type(error).__name__}: {error}") from None
