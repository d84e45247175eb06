"""Variant detection from configs: every tiny model is named right, contradictions are refused."""

import json

import pytest
from cogtune.shared.errors import CogtuneError
from cogtune.shared.models import open_model
from cogtune.shared.variants import VARIANTS, detect_variant, get_variant
from cogtune.shared.zoo import (
    build_tiny_pipeline,
    tiny_transformer_config,
    tiny_vae_config,
)


def test_detector_names_each_tiny_model(tiny_models, variant_slug):
    model = open_model(tiny_models[variant_slug])
    assert model.variant is VARIANTS[variant_slug]


def test_table_matches_the_configs_that_define_each_variant(variant_slug):
    v = VARIANTS[variant_slug]
    tc = tiny_transformer_config(v)
    assert (tc["in_channels"] == 32) == (v.task == "i2v")
    assert tc["patch_size_t"] == v.patch_size_t
    assert (tc["ofs_embed_dim"] is not None) == v.uses_ofs
    assert tiny_vae_config(v)["invert_scale_latents"] == v.invert_scale_latents


def test_variant_lookup_by_slug_and_name():
    assert get_variant("CogVideoX-5b-I2V") is VARIANTS["5b-i2v"]
    with pytest.raises(CogtuneError, match="unknown variant"):
        get_variant("7b")


def _configs(slug):
    v = VARIANTS[slug]
    return dict(tiny_transformer_config(v)), dict(tiny_vae_config(v)), v.pipeline_class


def test_i2v_channels_with_t2v_pipeline_is_refused():
    tc, vc, _ = _configs("5b-i2v")
    with pytest.raises(CogtuneError, match="in_channels 32 means image-to-video, but model_index.json names CogVideoXPipeline"):
        detect_variant(tc, vc, "CogVideoXPipeline", where="m")


@pytest.mark.parametrize(
    "slug, change, message",
    [
        ("1.5-5b-i2v", {"ofs_embed_dim": None}, "matches no CogVideoX variant"),
        ("5b", {"ofs_embed_dim": 16}, "matches no CogVideoX variant"),
        ("5b", {"in_channels": 24}, "neither out_channels 16"),
        ("1.5-5b", {"use_rotary_positional_embeddings": False}, "matches no CogVideoX variant"),
    ],
)
def test_contradicting_transformer_configs_are_refused(slug, change, message):
    tc, vc, pipe = _configs(slug)
    tc.update(change)
    with pytest.raises(CogtuneError, match=message):
        detect_variant(tc, vc, pipe, where="m")


def test_wrong_latent_scaling_rule_is_refused():
    tc, vc, pipe = _configs("1.5-5b")
    vc["invert_scale_latents"] = False
    with pytest.raises(CogtuneError, match="invert_scale_latents is false, but CogVideoX1.5-5B"):
        detect_variant(tc, vc, pipe)


def test_contradiction_on_disk_is_a_one_line_error_naming_the_folder(tmp_path):
    pipe = build_tiny_pipeline("5b-i2v")
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["_class_name"] = "CogVideoXPipeline"
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CogtuneError) as e:
        open_model(tmp_path).variant
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_missing_folder_and_non_model_folder(tmp_path):
    with pytest.raises(CogtuneError, match="no model_index.json"):
        open_model(tmp_path)
    with pytest.raises(CogtuneError, match="no such model folder"):
        open_model(tmp_path / "nope")
