"""`--config FILE` for the typer CLIs: a YAML or TOML file whose keys mirror the command's options.

The file only supplies defaults (click's ``default_map``): an option given on the command line wins.
Keys may be written as on the command line (``learning-rate``) or as Python names (``learning_rate``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from .errors import CogtuneError, exit_on_user_error


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON file into a flat dict with Python-style keys."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise CogtuneError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as e:  # each parser has its own error type; the user needs the file and the reason
        raise CogtuneError(f"{path}: not a valid config file ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CogtuneError(f"{path}: a config file must be a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


@exit_on_user_error  # it runs while click parses, before the command's own wrapper
def apply_config(ctx: typer.Context, param: Any, value: Path | None) -> Path | None:
    """Eager click callback for ``--config``: load the file and make its keys the command's defaults."""
    if value is None:
        return value
    data = load_config_file(value)
    known = {p.name for p in ctx.command.params}
    unknown = sorted(set(data) - known)
    renamed = getattr(ctx.command, "renamed_options", {})  # {old key: new key} of a command that renamed some
    if set(unknown) & set(renamed):
        raise CogtuneError(f"{value}: " + "; ".join(f"{k} was renamed {renamed[k]}" for k in unknown if k in renamed))
    if unknown:
        raise CogtuneError(f"{value}: unknown option(s) {', '.join(unknown)}")
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


def config_option() -> Any:
    return typer.Option(
        None,
        "--config",
        help="YAML or TOML file whose keys mirror these options (command-line options win).",
        callback=apply_config,  # a missing file or a folder is refused there, in one line
        is_eager=True,
    )
