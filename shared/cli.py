"""What the two typer apps share: --version, and one-line errors for bad input."""

from __future__ import annotations

import os

import typer

from .. import __version__


def quiet_hub_progress_bars() -> None:
    """--no-progress also silences transformers' and the hub's own bars ("Loading weights", downloads): both
    read this switch when first imported, which the CLIs delay until a model is loaded."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def make_app(name: str, help: str) -> typer.Typer:
    app = typer.Typer(name=name, help=help, no_args_is_help=True, add_completion=False,
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
