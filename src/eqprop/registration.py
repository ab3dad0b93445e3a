"""What the registries share: telling a second registration of the same definition (a plugin file
imported again, e.g. as a script and then as the run's plugin) from a clash of two definitions."""
from __future__ import annotations

import inspect


def same_definition(a: object, b: object) -> bool:
    """True when ``a`` and ``b`` are the same class or function, or the same definition (name and
    source file) executed twice."""
    if a is b:
        return True
    try:
        return a.__qualname__ == b.__qualname__ and inspect.getfile(a) == inspect.getfile(b)  # type: ignore[attr-defined, arg-type]
    except (AttributeError, TypeError):
        return False
