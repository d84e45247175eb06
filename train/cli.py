"""cogtrain: fine-tune CogVideoX (LoRA or full) on a store written by cogprep.

``cogtrain run`` has one option per `TrainConfig` field, with the field's name and its docstring as help, so
the config file keys, the saved ``RUN/config.yaml`` and the command line always agree.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Optional

import typer

from ..shared.cli import make_app, quiet_bitsandbytes_import, quiet_hub_progress_bars
from ..shared.config import config_option
from ..shared.errors import exit_on_user_error
from .config import TrainConfig, field_help, parse_target_modules

app = make_app(
    "cogtrain",
    "Fine-tune CogVideoX (LoRA or full) on the cached tensors of a cogprep store; outputs load straight into "
    "the diffusers pipelines.",
)


def _comma_list(value: str | list[str]) -> str:
    """--target-modules as typed (``to_q,to_k``) or as a config file's list: one comma-separated string."""
    return ",".join(parse_target_modules(value))


def run_parameters() -> list[inspect.Parameter]:
    """The ``run`` command's options, one per TrainConfig field, plus ``--config``."""
    hints = typing.get_type_hints(TrainConfig)
    docs = field_help(TrainConfig)
    parameters = []
    for f in fields(TrainConfig):
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = ...  # required
        annotation, extra = hints[f.name], {}
        if f.name == "target_modules":
            annotation, default, extra = str, _comma_list(default), {"parser": _comma_list}
        flag = f"--{f.name.replace('_', '-')}"
        if annotation is bool:
            flag = f"{flag}/--no-{f.name.replace('_', '-')}"
        option = typer.Option(default, flag, help=docs[f.name], **extra)
        parameters.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=annotation))
    parameters.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=config_option(),
                                        annotation=Optional[Path]))
    return parameters


@exit_on_user_error
def run(**options: Any) -> None:
    """Fine-tune MODEL on the cached tensors of STORE; weights, checkpoints and logs go to OUT."""
    options.pop("config")
    # both before the trainer's imports: the hub reads its switch on import, and peft imports bitsandbytes
    if not options["progress"]:
        quiet_hub_progress_bars()
    if options["optimizer"] != "adamw8bit":
        quiet_bitsandbytes_import()
    from .preemption import EXIT_PREEMPTED, Preempted
    from .trainer import train

    try:
        train(TrainConfig(**options))
    except Preempted:  # the trainer has said so on the main process
        raise SystemExit(EXIT_PREEMPTED) from None


run.__signature__ = inspect.Signature(run_parameters())  # type: ignore[attr-defined]
app.command()(run)


def main() -> None:
    app()


if __name__ == "__main__":  # python -m cogtune.train.cli, e.g. under torchrun
    main()
