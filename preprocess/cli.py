"""cogprep: encode a video dataset once into a bucketed, content-keyed store for cogtrain."""

from __future__ import annotations

from ..shared.cli import make_app

app = make_app(
    "cogprep",
    "Encode a video dataset once (VAE latents, T5 embeddings, I2V first frames) into a bucketed store that "
    "cogtrain reads; re-running after a dataset edit encodes only what changed.",
)


def main() -> None:
    app()
