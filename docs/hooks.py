"""MkDocs hooks: the pages that are generated, not written, so they cannot go stale.

``{{ cli_reference }}`` becomes every command's ``--help``; ``{{ config_reference }}``
every configuration key with its type, default and description (from the
schema); ``{{ reproduction_table }}`` the table rendered from the run records in
``benchmarks/reproduction/``.
"""
from __future__ import annotations

import importlib.util
import json
import types
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    for marker, render in (("{{ cli_reference }}", cli_reference), ("{{ config_reference }}", config_reference),
                           ("{{ reproduction_table }}", reproduction_table)):
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown


def cli_reference() -> str:
    from eqprop.cli import build_parser

    parser = build_parser()
    sections = ["## eqprop", "", "```text", parser.format_help().rstrip(), "```"]
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in commands.choices.items():
        sections += ["", f"## eqprop {name}", "", "```text", sub.format_help().rstrip(), "```"]
    return "\n".join(sections)


def config_reference() -> str:
    from eqprop.config import CNNConfig, MLPConfig, RunConfig

    lines = []
    sections = [(name, field.annotation) for name, field in RunConfig.model_fields.items()
                if name != "model" and isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields")]
    sections = [("model (kind mlp)", MLPConfig), ("model (kind cnn)", CNNConfig)] + sections
    top = [(name, field) for name, field in RunConfig.model_fields.items()
           if not (isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"))
           and name != "model"]
    lines += ["## top level", "", *_table(top)]
    for title, schema in sections:
        lines += ["", f"## {title}", "", (schema.__doc__ or "").strip().splitlines()[0], "",
                  *_table(list(schema.model_fields.items()))]
    return "\n".join(lines)


def _table(fields: list[tuple[str, Any]]) -> list[str]:
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name, field in fields:
        default = field.get_default(call_default_factory=True)
        shown = json.dumps(default.model_dump() if hasattr(default, "model_dump") else default, default=str)
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {_type_name(field)} | `{shown}` | {description} |")
    return rows


def _type_name(field: Any) -> str:
    """The field's type as a reader writes it: ``int``, ``"auto" or bool``, ``list of int``..."""
    return _format_type(field.annotation)


def _format_type(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Annotated:
        return _format_type(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_format_type(a) for a in args)
    if origin is typing.Literal:
        return " or ".join(json.dumps(a) for a in args)
    if origin is list:
        return f"list of {_format_type(args[0])}"
    if origin is tuple:
        return "(" + ", ".join(_format_type(a) for a in args) + ")"
    if kind is type(None):
        return "null"
    return getattr(kind, "__name__", str(kind))


def reproduction_table() -> str:
    spec = importlib.util.spec_from_file_location("eqprop_reproduction", ROOT / "benchmarks" / "reproduction.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.table()
