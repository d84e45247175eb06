"""Tiny models: the real diffusers layout, loadable by the real pipelines, deterministic, small."""

import hashlib

import numpy as np
import PIL.Image
import pytest
import torch
from cogtune.shared.models import open_model
from cogtune.shared.zoo import TINY_NATIVE, make_tiny_model


def test_pipeline_from_pretrained_generates_frames(tiny_models, variant_slug):
    model = open_model(tiny_models[variant_slug])
    v = model.variant
    pipe = model.pipeline_class().from_pretrained(model.path)
    assert type(pipe).__name__ == v.pipeline_class
    frames, height, width = TINY_NATIVE[v.generation]
    kwargs = dict(prompt="a red circle moving left", num_inference_steps=2, num_frames=frames, height=height,
                  width=width, output_type="np", generator=torch.Generator().manual_seed(0))
    if v.task == "i2v":
        kwargs["image"] = PIL.Image.fromarray(np.full((height, width, 3), 128, np.uint8))
    video = np.asarray(pipe(**kwargs).frames)
    assert video.shape == (1, frames, height, width, 3)
    assert np.isfinite(video).all()


def test_loaders_load_each_component_in_the_dtype_asked(tiny_models):
    model = open_model(tiny_models["5b"])
    assert next(model.load_transformer(torch.bfloat16).parameters()).dtype == torch.bfloat16
    assert next(model.load_vae(torch.float16).parameters()).dtype == torch.float16
    assert next(model.load_text_encoder(torch.float32).parameters()).dtype == torch.float32
    assert type(model.load_scheduler()).__name__ == "CogVideoXDDIMScheduler"
    ids = model.load_tokenizer()("a red circle").input_ids
    assert ids[-1] == 1 and 2 not in ids  # ends with </s>, no unknown tokens for caption words


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("slug", ["2b", "1.5-5b-i2v"])
def test_same_seed_same_files_other_seed_other_weights(tmp_path, slug):
    a = make_tiny_model(slug, tmp_path / "a", seed=3)
    b = make_tiny_model(slug, tmp_path / "b", seed=3)
    c = make_tiny_model(slug, tmp_path / "c", seed=4)
    assert _digest(a) == _digest(b) != _digest(c)
    size = sum(p.stat().st_size for p in a.rglob("*") if p.is_file())
    assert size < 2_000_000
