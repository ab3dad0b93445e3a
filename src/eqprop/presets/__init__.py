"""Named, runnable configurations: one YAML file per paper row (plus ``demo``)."""
from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from ..config import ConfigError


def preset_names() -> list[str]:
    """All preset names, sorted."""
    return sorted(f.name.removesuffix(".yaml") for f in resources.files(__name__).iterdir()
                  if f.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The raw configuration data of preset ``name`` (validate with ``validate_config``)."""
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; run 'eqprop presets' to list them")
    return yaml.safe_load(resources.files(__name__).joinpath(f"{name}.yaml").read_text())
