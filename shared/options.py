"""Command-line options made from dataclasses: one option per field, named after it, its docstring as help.

A setting is then described in one place, its dataclass, and the command line, a ``--config`` file (same keys)
and the code that reads the dataclass cannot drift apart. A `Literal` field becomes a choice that click checks
while it parses; ``field(metadata={"option": {...}})`` passes more `typer.Option` arguments (``min=1``).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import typing
from collections.abc import Iterable
from dataclasses import MISSING, Field, fields
from typing import Any

import typer


def field_help(cls: type) -> dict[str, str]:
    """{field name: the docstring written under it}, read from the class source."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def field_default(f: Field) -> Any:
    """The field's default, ``...`` (typer's "required") when it has none."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return ...


def option_flag(name: str, annotation: Any) -> str:
    """``--name-with-dashes``, and ``--x/--no-x`` for a bool."""
    flag = f"--{name.replace('_', '-')}"
    return f"{flag}/--no-{name.replace('_', '-')}" if annotation is bool else flag


def dataclass_options(cls: type, exclude: Iterable[str] = ()) -> list[inspect.Parameter]:
    """Keyword-only typer parameters, one per field of `cls` not in `exclude`, for a command's signature."""
    hints = typing.get_type_hints(cls)
    docs = field_help(cls)
    skipped = set(exclude)
    parameters = []
    for f in fields(cls):
        if f.name in skipped:
            continue
        if f.name not in docs:  # a programming error, caught by the suite's every-option-has-help test
            raise TypeError(f"{cls.__name__}.{f.name}: no docstring under the field, which is its --help")
        annotation = hints[f.name]
        option = typer.Option(field_default(f), option_flag(f.name, annotation), help=docs[f.name],
                              **f.metadata.get("option", {}))
        parameters.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=annotation))
    return parameters


def pick(cls: type, values: dict[str, Any], exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The entries of `values` that are fields of `cls` (less `exclude`): a command's options for one dataclass."""
    names = {f.name for f in fields(cls)} - set(exclude)
    return {k: v for k, v in values.items() if k in names}
