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
