"""What the two typer apps share: --version, one-line errors for bad input, and output that reads well in a log."""

from __future__ import annotations

import logging
import os
import sys

import typer

from .. import __version__


def quiet_hub_progress_bars() -> None:
    """--no-progress also silences transformers' and the hub's own bars ("Loading weights", downloads): both
    read this switch when first imported, which the CLIs delay until a model is loaded."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def quiet_bitsandbytes_import() -> None:
    """On a CPU with AVX512-BF16, importing bitsandbytes warns "Failed to load CPU gemm_4bit_forward from
    kernels-community: No module named 'kernels'", and peft imports it on every LoRA run. That 4-bit kernel serves
    no cogtrain run: the warning is left only to runs that use bitsandbytes (--optimizer adamw8bit). Call it before
    peft is imported; the logger keeps its level for the import that comes later."""
    logging.getLogger(BITSANDBYTES_CPU_LOGGER).setLevel(logging.ERROR)


LOG_WIDTH = 200
"""Columns of rich's tables and summaries when stdout is not a terminal (a log file, a pipe, CI)."""


def wide_console():
    """A rich console for tables and summaries. Written to a log file, rich would wrap at 80 columns and cut every
    table row and summary across lines: there it gets LOG_WIDTH columns (COLUMNS, when set, still decides)."""
    from rich.console import Console

    log = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=LOG_WIDTH if log else None)


def make_app(name: str, help: str) -> typer.Typer:
    # rich_markup_mode=None: click's plain help, which wraps the help text and never cuts an option name or a
    # default, at 80 columns and through a pipe alike (rich's option table truncates both with an ellipsis)
    app = typer.Typer(name=name, help=help, no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                      context_settings={"help_option_names": ["-h", "--help"]})

    def show_version(value: bool) -> None:
        if value:
            typer.echo(f"{name} (cogtune) {__version__}")
            raise typer.Exit()

    @app.callback()
    def _root(
        version: bool = typer.Option(False, "--version", help="Print the version and exit.", callback=show_version,
                                     is_eager=True),
    ) -> None:
        pass

    _root.__doc__ = help
    return app
