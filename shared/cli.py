"""What the two typer apps share: --version, one-line errors for bad input, and output that reads well in a log."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

import typer

from .. import __version__


def quiet_hub_progress_bars() -> None:
    """--no-progress also silences transformers' and the hub's own bars ("Loading weights", downloads): both
    read this switch when first imported, which the CLIs delay until a model is loaded."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


@contextlib.contextmanager
def bitsandbytes_hidden() -> Iterator[None]:
    """Keep the libraries imported inside from importing bitsandbytes. Where it is installed (the quickstart
    installs it for --optimizer adamw8bit), diffusers' model code imports it for its quantizers and peft for LoRA
    on quantized layers, neither of which cogtune uses: 1.2 to 1.8 s of CPU in every process, torch's inductor
    included, and on a CPU with AVX512-BF16 the warning "Failed to load CPU gemm_4bit_forward from
    kernels-community". A None in sys.modules makes importlib.util.find_spec, their test for it, find nothing; both
    keep that answer (diffusers in a module constant, peft in an lru_cache), so import them, and call peft's test,
    inside. `import bitsandbytes` works again after."""
    if "bitsandbytes" in sys.modules:  # imported already: nothing to save
        yield
        return
    logging.getLogger(BITSANDBYTES_CPU_LOGGER).setLevel(logging.ERROR)  # should anything import it after all
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]


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
