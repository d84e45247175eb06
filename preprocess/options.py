"""cogprep encode's options: one per field of the dataclasses that take them, the field's docstring as help.

`EncodeInputs` (what to read and write), `FrameSampling` (how clips are cut), `EncodeSettings` (what is cached)
and `RunOptions` (how the encode runs) are the one place each option is named, typed, defaulted and described;
a ``--config`` file uses the same keys. `EncodeRequest.from_options` turns the parsed values back into them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from ..shared.config import config_option
from ..shared.errors import CogtuneError
from ..shared.models import Model
from ..shared.options import dataclass_options, pick
from .datasets import Layout
from .encode import RunOptions
from .frames import FrameSampling
from .plan import EncodeSettings


@dataclass(frozen=True)
class EncodeInputs:
    """What cogprep encode reads and writes."""

    model: str
    """CogVideoX model: a local diffusers folder or a hub id."""
    out: Path
    """Store folder to create or update (not the dataset's own folder)."""
    resolution: str | None = None
    """One bucket FRAMESxHEIGHTxWIDTH (default: the model's native size)."""
    buckets: Path | None = None
    """YAML/TOML bucket file: resolutions, frames, batch sizes, token budget."""
    fps: str | None = None
    """Frame rate clips are sampled at: N, or 'source' to keep each video's own (default: the model's, 8 for
    CogVideoX 1.0 and 16 for 1.5, the rate it was trained at and its pipelines export at)."""
    layout: Layout | None = None
    """Dataset layout (default: detected)."""
    caption_column: str | None = None
    """CSV caption column (txt layout: the prompts file name)."""
    video_column: str | None = None
    """CSV video column (txt layout: the videos file name)."""
    id_token: str | None = None
    """Prefix every caption with this token (DreamBooth style)."""


SAMPLING_SET_ELSEWHERE = ("fps",)
"""FrameSampling.fps comes from EncodeInputs.fps and the model (`sampling_fps`)."""
SETTINGS_SET_ELSEWHERE = ("buckets", "sampling", "text_length")
"""EncodeSettings fields made from the bucket options, the FrameSampling options and the model."""


def encode_parameters() -> list[inspect.Parameter]:
    """The ``encode`` command's signature: DATASET, one option per dataclass field, ``--quiet``, ``--verbose``
    and ``--config``."""
    dataset = typer.Argument(..., metavar="DATASET",
                             help="Dataset folder (prompts.txt + videos.txt, a CSV, or JSON/JSONL) or file.")
    return [
        inspect.Parameter("dataset", inspect.Parameter.KEYWORD_ONLY, default=dataset, annotation=Path),
        *dataclass_options(EncodeInputs),
        *dataclass_options(FrameSampling, exclude=SAMPLING_SET_ELSEWHERE),
        *dataclass_options(EncodeSettings, exclude=SETTINGS_SET_ELSEWHERE),
        *dataclass_options(RunOptions),
        *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=bool)
          for name, option in (("quiet", quiet_option("no progress bar, summary table or line")),
                               ("verbose", verbose_option("also each step's plan and each skipped item with its "
                                                          "reason")))),
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=config_option(),
                          annotation=Optional[Path]),
    ]


def quiet_option(hidden: str) -> Any:
    """A command's ``--quiet``; `hidden`: what it leaves out of the command's output."""
    return typer.Option(False, "--quiet", help=f"Say only warnings and errors: {hidden}.")


def verbose_option(added: str) -> Any:
    """A command's ``--verbose``; `added`: what it adds to the command's output."""
    return typer.Option(False, "--verbose", help=f"Say more: {added}.")


@dataclass(frozen=True)
class EncodeRequest:
    """The parsed ``encode`` options, back in their dataclasses."""

    dataset: Path
    inputs: EncodeInputs
    sampling: FrameSampling
    """As given; its fps is set once the model is known (`sampling_fps`)."""
    settings: dict[str, Any]
    """The EncodeSettings options given (resize, dtype, image_noise_variants, seed)."""
    run: RunOptions

    @classmethod
    def from_options(cls, values: dict[str, Any]) -> EncodeRequest:
        """Refuses bad frame sampling (FrameSampling checks itself) before any model is opened."""
        return cls(
            dataset=Path(values["dataset"]),
            inputs=EncodeInputs(**pick(EncodeInputs, values)),
            sampling=FrameSampling(**pick(FrameSampling, values, exclude=SAMPLING_SET_ELSEWHERE)),
            settings=pick(EncodeSettings, values, exclude=SETTINGS_SET_ELSEWHERE),
            run=RunOptions(**pick(RunOptions, values)),
        )

    def check_out(self) -> None:
        """Refuse, in one line, an --out that is a file, or the dataset's own folder: the store's files would mix
        with the dataset's, and the next read of the dataset folder would find store.json and report.json too."""
        out = self.inputs.out
        if out.exists() and not out.is_dir():
            raise CogtuneError(f"{out}: a file, not a folder: --out takes the store folder to create or update")
        root = self.dataset if self.dataset.is_dir() else self.dataset.parent
        if out.resolve() == root.resolve():
            raise CogtuneError(f"{out}: the dataset's own folder: give --out a folder of its own for the store "
                               f"(e.g. {root.resolve()}-store)")


def sampling_fps(fps: str | None, model: Model) -> float | None:
    """--fps as FrameSampling takes it: the model's rate by default, None for 'source', else the number given.

    49 frames of a 30 fps clip cover 1.6 s where CogVideoX-5b was trained on 6.1 s at 8 fps: trained at the
    source's rate, a LoRA learns slow motion, which the pipelines' 8 (or 16) fps export plays slower still."""
    if fps is None:
        return float(model.variant.fps)
    if fps == "source":
        return None
    try:
        value = float(fps)
    except ValueError:
        raise CogtuneError(f"--fps {fps!r}: give a frame rate, or 'source' to keep each video's own") from None
    if not value > 0:
        raise CogtuneError(f"--fps {fps}: must be positive")
    return value
