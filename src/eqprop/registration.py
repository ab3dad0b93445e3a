"""What the registries share: telling a second registration of the same definition (a plugin file
imported again, e.g. as a script and then as the run's plugin) from a clash of two definitions."""
from __future__ import annotations

import inspect
from typing import TypeVar

T = TypeVar("T", bound=type)


def same_definition(a: object, b: object) -> bool:
    """True when ``a`` and ``b`` are the same class or function, or the same definition (name and
    source file) executed twice."""
    if a is b:
        return True
    try:
        return a.__qualname__ == b.__qualname__ and inspect.getfile(a) == inspect.getfile(b)  # type: ignore[attr-defined, arg-type]
    except (AttributeError, TypeError):
        return False


def add_class(table: dict[str, T], kind: str, name: str, cls: T) -> T:
    """Register ``cls`` as ``name`` in ``table`` (a ``kind`` registry such as "solver") and set its
    ``name``; a name taken by another definition is refused, so that a built-in keeps its meaning."""
    if name in table and not same_definition(table[name], cls):
        raise ValueError(f"{kind} {name!r} is already registered")
    cls.name = name
    table[name] = cls
    return cls


def registered_class(table: dict[str, T], kind: str, name: str) -> T:
    """The class registered as ``name`` in ``table``, or a one-line error listing the names."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {', '.join(sorted(table))}") from None
