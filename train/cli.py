"""cogtrain: fine-tune CogVideoX (LoRA or full) on a store written by cogprep.

``cogtrain run`` has one option per `TrainConfig` field, with the field's name and its docstring as help, so
the config file keys, the saved ``RUN/config.yaml`` and the command line always agree; ``--quiet`` and
``--verbose`` (how much it says) and ``--config`` are the command line's alone. Other trainers' option names
are answered with ours (`train.peer_options`).
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperCommand

from ..shared.cli import bitsandbytes_hidden, make_app, quiet_hub_progress_bars
from ..shared.config import config_option
from ..shared.errors import exit_on_user_error
from ..shared.log import setup_logging, verbosity
from ..shared.options import dataclass_options
from .config import TrainConfig, parse_target_modules
from .peer_options import RENAMED, refuse_peer_options

app = make_app(
    "cogtrain",
    "Fine-tune CogVideoX (LoRA or full) on the cached tensors of a cogprep store; outputs load straight into "
    "the diffusers pipelines.",
)


class RunCommand(TyperCommand):
    """``cogtrain run``: before click parses, another trainer's option name (or an old one of ours) is answered
    with ours in one line, where click would suggest a near spelling (``--output_dir``: ``--optimizer``)."""

    renamed_options = RENAMED
    """Read by ``--config`` (`shared.config.apply_config`) to name the new key of a renamed one."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        ours = {name for param in self.params for name in (*param.opts, *param.secondary_opts)}
        exit_on_user_error(refuse_peer_options)(args, ours)
        return super().parse_args(ctx, args)


def _comma_list(value: str | list[str]) -> str:
    """--target-modules as typed (``to_q,to_k``) or as a config file's list: one comma-separated string."""
    return ",".join(parse_target_modules(value))


def run_parameters() -> list[inspect.Parameter]:
    """The ``run`` command's options, one per TrainConfig field, plus ``--quiet``, ``--verbose`` and ``--config``."""
    parameters = dataclass_options(TrainConfig)
    for i, parameter in enumerate(parameters):
        if parameter.name == "target_modules":  # typed as one comma-separated string, held as a list
            option = typer.Option(_comma_list(parameter.default.default), "--target-modules",
                                  help=parameter.default.help, parser=_comma_list)
            parameters[i] = parameter.replace(default=option, annotation=str)
    for name, words in (("quiet", "Say only warnings and errors: no banner, bar or step lines."),
                        ("verbose", "Also log every step's metrics and each checkpoint written.")):
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                            default=typer.Option(False, f"--{name}", help=words)))
    parameters.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=config_option(),
                                        annotation=Optional[Path]))
    return parameters


@exit_on_user_error
def run(**options: Any) -> None:
    """Fine-tune MODEL on the cached tensors of STORE; weights, checkpoints and logs go to OUT."""
    options.pop("config")
    setup_logging("cogtrain", verbosity(options.pop("quiet"), options.pop("verbose")))
    if not options["progress"]:  # before the trainer's imports: the hub reads its switch on import
        quiet_hub_progress_bars()
    with contextlib.nullcontext() if options["optimizer"] == "adamw8bit" else bitsandbytes_hidden():
        from .preemption import EXIT_PREEMPTED, Preempted
        from .trainer import import_peft, train

        import_peft()

    try:
        train(TrainConfig(**options))
    except Preempted:  # the trainer has said so on the main process
        raise SystemExit(EXIT_PREEMPTED) from None


run.__signature__ = inspect.Signature(run_parameters())  # type: ignore[attr-defined]
app.command(cls=RunCommand)(run)


def main() -> None:
    app()


if __name__ == "__main__":  # python -m cogtune.train.cli, e.g. under torchrun
    main()
