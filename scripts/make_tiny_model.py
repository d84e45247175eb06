#!/usr/bin/env python3
"""Write a tiny random CogVideoX model of one variant in the diffusers layout (seconds, well under 1 MB)."""

from pathlib import Path

import typer
from cogtune.shared.variants import VARIANTS
from cogtune.shared.zoo import make_tiny_model


def main(
    variant: str = typer.Option(..., help=f"Which variant to imitate: {', '.join(VARIANTS)}."),
    out: Path = typer.Option(..., help="Folder to write the model to (created)."),
    seed: int = typer.Option(0, help="Seed of the random weights: the same seed writes the same files."),
) -> None:
    if variant not in VARIANTS:
        raise typer.BadParameter(f"choose one of {', '.join(VARIANTS)}", param_hint="--variant")
    path = make_tiny_model(variant, out, seed=seed)
    print(f"wrote tiny {VARIANTS[variant].name} to {path}")


if __name__ == "__main__":
    typer.run(main)
