"""The fixed size of a learned-positional-embedding model (CogVideoX-5b-I2V): diffusers' patch embed reads the
learned table at the native frames x height x width only, so cogprep, cogtrain and validation refuse every
other size (cogtrain's refusal is tested with its other refusals, in test_train_run.py)."""

from __future__ import annotations

import json

import pytest
import torch
from cogtune.shared import store as S
from cogtune.shared.buckets import bucket_spec_from_resolution
from cogtune.shared.errors import CogtuneError
from cogtune.shared.models import Model, open_model
from cogtune.shared.zoo import TINY_NATIVE
from cogtune.train.validation import run_validation
from prep_helpers import cogprep, encode

NATIVE = TINY_NATIVE["1.0"]
"""The tiny 5b-I2V's native (frames, height, width): 9x32x48."""


# ---------------------------------------------------------------------------------------------------------
# diffusers: the fact the refusals follow


@pytest.fixture
def patch_embed(tiny_models):
    """The tiny 5b-I2V's own `CogVideoXPatchEmbed`, as diffusers loads it from the checkpoint."""
    return open_model(tiny_models["5b-i2v"]).load_transformer().patch_embed


def embed(patch_embed, frames: int, height: int, width: int) -> torch.Tensor:
    """The patch embed's output for fixed random inputs of a `frames` x `height` x `width` video (in pixels)."""
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, patch_embed.max_text_seq_length, patch_embed.text_proj.in_features, generator=g)
    latent_frames = (frames - 1) // patch_embed.temporal_compression_ratio + 1
    video = torch.randn(1, latent_frames, patch_embed.proj.in_channels, height // 8, width // 8, generator=g)
    with torch.no_grad():
        return patch_embed(text, video)


def test_diffusers_reads_the_learned_table_at_the_native_frame_count_only(patch_embed):
    frames, height, width = NATIVE
    assert patch_embed.use_learned_positional_embeddings
    others = (17, 1)  # a longer bucket, and the 1-frame bucket of an image
    before = {f: embed(patch_embed, f, height, width) for f in (frames, *others)}
    with torch.no_grad():
        patch_embed.pos_embedding.add_(1.0)  # another learned table
    after = {f: embed(patch_embed, f, height, width) for f in (frames, *others)}
    torch.testing.assert_close(after[frames], before[frames] + 1.0)  # the native size adds the learned table
    for f in others:
        # Another frame count never reads it: diffusers adds a sin-cos table made for that size instead. Should a
        # later diffusers interpolate the learned table, this fails, and the frame-count refusal is to be revisited.
        assert torch.equal(after[f], before[f]), f"{f} frames read the learned table: diffusers changed"
    with pytest.raises(ValueError):  # another height or width: diffusers refuses by itself
        embed(patch_embed, frames, height, width + 16)


# ---------------------------------------------------------------------------------------------------------
# the rule: Model.check_size


def released_5b_i2v(folder) -> Model:
    """CogVideoX-5b-I2V as published (THUDM/CogVideoX-5b-I2V), configs only: what its size rule reads."""
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXImageToVideoPipeline"}))
    config = {"in_channels": 32, "out_channels": 16, "sample_frames": 49, "sample_height": 60, "sample_width": 90,
              "use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": True}
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    return open_model(folder, components=("transformer",))


def test_the_released_5b_i2v_takes_its_native_49x480x720_only(tmp_path):
    model = released_5b_i2v(tmp_path)
    assert model.native_size() == (49, 480, 720)
    model.check_size(49, 480, 720, "bucket")
    for size in ["17x480x720", "1x480x720", "49x512x768"]:
        with pytest.raises(CogtuneError) as error:
            model.check_size(*map(int, size.split("x")), "bucket")
        assert str(error.value).startswith(
            f"bucket {size}: CogVideoX-5b-I2V has learned positional embeddings that exist only at its native "
            f"49x480x720; "
        )


# ---------------------------------------------------------------------------------------------------------
# cogprep and validation refuse before any work


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_cogprep_encode_refuses_another_frame_count_and_writes_nothing(tiny_models, demo_txt, tmp_path):
    store = tmp_path / "store"
    line = error_line(encode(demo_txt, tiny_models["5b-i2v"], store, "--resolution", "17x32x48", expect=2))
    assert line == ("error: --resolution 17x32x48: bucket 17x32x48: CogVideoX-5b-I2V has learned positional "
                    "embeddings that exist only at its native 9x32x48; encode and train at that size "
                    "(--resolution 9x32x48)")
    assert not store.exists()


def test_cogprep_status_refuses_a_store_made_at_another_frame_count(tiny_models, demo_txt, tmp_path):
    """A store an older cogtune encoded at 17 frames, when only height and width were checked: its manifest
    written by hand, as cogprep would no longer make it."""
    model, store = tiny_models["5b-i2v"], tmp_path / "store"
    store.mkdir()
    S.Manifest(model={"source": str(model), "path": str(model), "variant": "CogVideoX-5b-I2V"},
               settings={"buckets": bucket_spec_from_resolution("17x32x48").to_json()},
               dataset={"path": str(demo_txt)}).save(store)
    before = {p: p.read_bytes() for p in store.rglob("*")}
    line = error_line(cogprep("status", demo_txt, "--store", store, expect=2))
    assert line.startswith(f"error: {store}: bucket 17x32x48: CogVideoX-5b-I2V has learned positional embeddings")
    assert {p: p.read_bytes() for p in store.rglob("*")} == before


def test_validation_refuses_another_frame_count(tiny_models, tmp_path):
    model = open_model(tiny_models["5b-i2v"])
    S.write_extras(tmp_path, {"empty_embedding": torch.zeros(226, 16)}, {"validation_prompts": '["a prompt"]'})
    bucket = {"name": "9x32x48", "frames": 9, "height": 32, "width": 48, "batch_size": 1, "samples": 1}
    S.Manifest(model={}, settings={}, dataset={}, buckets=[bucket]).save(tmp_path)
    with pytest.raises(CogtuneError, match="^validation size 17x32x48: CogVideoX-5b-I2V .* native 9x32x48"):
        run_validation(torch.nn.Module(), model, tmp_path, tmp_path / "run", 1, device="cpu", dtype=torch.float32,
                       seed=0, num_inference_steps=2, num_frames=17, height=None, width=None)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# the default size: each model's own, from its configs


def test_native_size_comes_from_the_model_configs(tiny_models, tmp_path):
    for slug, path in ((s, tiny_models[s]) for s in ("2b", "5b-i2v", "1.5-5b", "1.5-5b-i2v")):
        model = open_model(path)
        assert model.native_size() == TINY_NATIVE[model.variant.generation], slug
    # the 1.5 release's configs do not say it (sample_height/width are its RoPE grid's maximum): the release table
    released = tmp_path / "released-1.5"
    (released / "transformer").mkdir(parents=True)
    (released / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    config = {"in_channels": 16, "out_channels": 16, "patch_size_t": 2, "sample_frames": 81, "sample_height": 300,
              "sample_width": 300, "use_rotary_positional_embeddings": True}
    (released / "transformer" / "config.json").write_text(json.dumps(config))
    assert open_model(released, components=("transformer",)).native_size() == (81, 768, 1360)


@pytest.mark.parametrize("recorded", [[9, 48], [10, 48, 80], [9, 40, 80], "9x48x80"])
def test_a_recorded_native_size_that_is_no_size_is_refused_naming_the_file(tiny_models, tmp_path, recorded):
    from cogtune.shared.models import NATIVE_SIZE_KEY

    folder = tmp_path / "model"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text((tiny_models["1.5-5b"] / "model_index.json").read_text())
    config = json.loads((tiny_models["1.5-5b"] / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, NATIVE_SIZE_KEY: recorded}))
    with pytest.raises(CogtuneError, match=f"^{folder / 'transformer' / 'config.json'}: {NATIVE_SIZE_KEY} "):
        open_model(folder, components=("transformer",)).native_size()


def test_a_tiny_1_5_model_encodes_at_its_own_native_size_by_default(tiny_models, demo_txt, tmp_path):
    store = tmp_path / "store"
    cogprep("encode", demo_txt, "--model", tiny_models["1.5-5b"], "--out", store)  # no --resolution, no --buckets
    buckets = json.loads((store / "store.json").read_text())["buckets"]
    assert [b["name"] for b in buckets] == ["9x48x80"]  # not the release's 81x768x1360, where no clip fits
    assert buckets[0]["samples"] == 5  # every clip of the dataset
