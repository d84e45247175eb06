"""Shared fixtures: tiny models of every variant, written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cogtune.shared.demo import make_demo_dataset
from cogtune.shared.variants import VARIANTS
from cogtune.shared.zoo import make_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ALL_VARIANTS = list(VARIANTS)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Lazily built tiny models: ``tiny_models[slug]`` writes the model on first use and returns its folder."""

    class _Lazy(dict):
        def __missing__(self, slug: str) -> Path:
            path = make_tiny_model(slug, tmp_path_factory.mktemp(f"tiny-{slug}"), seed=0)
            self[slug] = path
            return path

    return _Lazy()


@pytest.fixture(params=ALL_VARIANTS)
def variant_slug(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def demo_txt(tmp_path_factory) -> Path:
    """A 5-clip demo dataset in the txt layout, shared read-only (copy it before editing)."""
    path = tmp_path_factory.mktemp("demo") / "txt"
    make_demo_dataset(path, count=5, seed=1, layout="txt")
    return path


@pytest.fixture(scope="session")
def demo_store(demo_txt, tiny_models, tmp_path_factory) -> Path:
    """`cogprep encode` of `demo_txt` on the tiny 5b with the tiny buckets, encoded once for the session and shared
    read-only: a test that re-encodes or edits it works on `prep_helpers.moved_store` of it."""
    from prep_helpers import encode

    store = tmp_path_factory.mktemp("demo-store") / "store"
    encode(demo_txt, tiny_models["5b"], store)
    return store


@pytest.fixture(scope="session")
def train_dataset(tmp_path_factory) -> Path:
    """The trainer tests' 4-clip demo dataset (txt layout), shared read-only."""
    path = tmp_path_factory.mktemp("train-demo") / "data"
    make_demo_dataset(path, count=4, seed=1, layout="txt")
    return path


@pytest.fixture(scope="session")
def train_store(train_dataset, tiny_models, tmp_path_factory) -> Path:
    """A real store for the trainer tests: cogprep encode of `train_dataset` on the tiny 5b, with one validation
    prompt. Shared read-only."""
    from prep_helpers import encode

    folder = tmp_path_factory.mktemp("train-store")
    prompts = folder / "validation.txt"
    prompts.write_text("a red circle moving left to right over a blue background\n")
    encode(train_dataset, tiny_models["5b"], folder / "store", "--validation-prompts", prompts)
    return folder / "store"


@pytest.fixture(scope="session")
def i2v_train_store(train_dataset, tiny_models, tmp_path_factory) -> Path:
    """`train_dataset` encoded for the tiny 1.5-5B-I2V at 9x48x80 with first-frame latents (clean and 2 noisy
    variants) and one validation prompt whose image is the first clip's first frame. Shared read-only: a test that
    edits it works on a copy."""
    from cogtune.shared.video import read_frames
    from PIL import Image
    from prep_helpers import encode

    folder = tmp_path_factory.mktemp("i2v-train-store")
    first_video = train_dataset / (train_dataset / "videos.txt").read_text().splitlines()[0]
    Image.fromarray(read_frames(first_video, [0])[0]).save(folder / "first.png")
    (folder / "prompts.txt").write_text("a red circle moving left to right over a blue background\n")
    (folder / "images.txt").write_text("first.png\n")
    encode(train_dataset, tiny_models["1.5-5b-i2v"], folder / "store", "--resolution", "9x48x80",
           "--image-noise-variants", "2", "--validation-prompts", folder / "prompts.txt", "--validation-images",
           folder / "images.txt")
    return folder / "store"
