"""cogtrain: fine-tune CogVideoX (LoRA or full) on a store written by cogprep."""

from __future__ import annotations

from ..shared.cli import make_app

app = make_app(
    "cogtrain",
    "Fine-tune CogVideoX (LoRA or full) on the cached tensors of a cogprep store; outputs load straight into "
    "the diffusers pipelines.",
)


def main() -> None:
    app()
