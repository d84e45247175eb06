"""Bucket specs (files and --resolution), token budgets, the fixed-size refusal, and bucket assignment."""

from __future__ import annotations

import math

import pytest
from cogtune.shared.buckets import (
    Bucket,
    assign_bucket,
    bucket_spec_from_resolution,
    check_buckets_for_model,
    frames_within_budget,
    is_valid_frame_count,
    latent_tokens,
    load_bucket_spec,
    parse_bucket_spec,
)
from cogtune.shared.errors import CogtuneError
from cogtune.shared.models import open_model
from cogtune.shared.variants import get_variant
from cogtune.shared.zoo import TINY_NATIVE
from hypothesis import given, settings
from hypothesis import strategies as st


def spec_of(**data):
    return parse_bucket_spec(data, "buckets.yaml")


def test_yaml_file_with_lists_and_batch_sizes(tmp_path):
    path = tmp_path / "buckets.yaml"
    path.write_text(
        "resolutions: [[480, 720], [720, 480]]\nframes: [49, 17]\nbatch_size: 2\nbatch_sizes: {'17x480x720': 4}\n"
    )
    spec = load_bucket_spec(path)
    assert spec.resolutions == [(480, 720), (720, 480)]
    assert [b.name for b in spec.buckets] == ["17x480x720", "17x720x480", "49x480x720", "49x720x480"]
    assert spec.batch_size_for(Bucket(17, 480, 720)) == 4
    assert spec.batch_size_for(Bucket(49, 720, 480)) == 2
    assert spec.batch_size_for(Bucket(1, 480, 720)) == 2  # image buckets take the default too


def test_toml_file_with_strings(tmp_path):
    path = tmp_path / "buckets.toml"
    path.write_text('resolutions = ["480x720", "512X512"]\nframes = [49]\n[batch_sizes]\n"1x512x512" = 8\n')
    spec = load_bucket_spec(path)
    assert spec.resolutions == [(480, 720), (512, 512)]
    assert spec.batch_size_for(Bucket(1, 512, 512)) == 8
    assert spec.batch_size == 1


def test_resolution_flag_is_one_bucket():
    spec = bucket_spec_from_resolution("49x480x720")
    assert [b.name for b in spec.buckets] == ["49x480x720"]
    assert spec.source == "--resolution 49x480x720"


def test_bucket_name_round_trips_and_has_no_dots():
    bucket = Bucket(49, 480, 720)
    assert bucket.name == "49x480x720" and "." not in bucket.name
    assert Bucket.parse(bucket.name) == bucket


def test_valid_frame_counts_are_8n_plus_1():
    assert [f for f in range(100) if is_valid_frame_count(f)] == [9, 17, 25, 33, 41, 49, 57, 65, 73, 81, 89, 97]


def test_token_budget_example_arithmetic():
    # 512x512x49: 13 latent frames x 32 x 32 tokens.
    assert latent_tokens(49, 512, 512) == 13312
    assert frames_within_budget(13312, 512, 512) == 49
    # The field's note says 768x768 -> 21 frames, but 21 frames are 6 latent frames x 48 x 48 = 13824 tokens,
    # over the budget (and 21 is not 8N+1); 17 frames (5 x 2304 = 11520 tokens) is the largest that fits.
    assert latent_tokens(21, 768, 768) == 13824 > 13312
    assert frames_within_budget(13312, 768, 768) == 17
    assert frames_within_budget(13312, 1024, 1024) == 9  # 3 x 4096 = 12288


def test_token_budget_counts_temporal_patches_for_1_5():
    # 1.5 patches time by 2: 97 frames are 25 latent frames, padded to 26, 13 patches x 1024 = 13312 tokens.
    assert latent_tokens(97, 512, 512, patch_size_t=2) == 13312
    assert frames_within_budget(13312, 512, 512, patch_size_t=2) == 97
    assert latent_tokens(81, 768, 1360, patch_size_t=2) == 11 * 48 * 85


def test_token_budget_fixes_frames_per_resolution():
    spec = spec_of(resolutions=[[512, 512], [768, 768], [1024, 1024]], token_budget=13312)
    assert [b.name for b in spec.buckets] == ["9x1024x1024", "17x768x768", "49x512x512"]
    one_five = parse_bucket_spec({"resolutions": [[512, 512]], "token_budget": 13312}, "b", get_variant("1.5-5b"))
    assert one_five.buckets == [Bucket(97, 512, 512)]


def test_token_budget_picks_among_listed_frames():
    spec = spec_of(resolutions=[[512, 512], [768, 768]], frames=[9, 49], token_budget=13312)
    assert spec.frames_by_resolution == {(512, 512): (49,), (768, 768): (9,)}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"resolutions": [[480, 722]], "frames": [49]}, "480x722: height and width must be multiples of 16"),
        ({"resolutions": [[480, 720]], "frames": [50]}, "frame count 50 is not 8N+1"),
        ({"resolutions": [[480, 720]]}, "give 'frames'"),
        ({"resolutions": [], "frames": [49]}, "'resolutions' must be a non-empty list"),
        ({"resolutions": ["480by720"], "frames": [49]}, "resolution '480by720' is not"),
        ({"resolutions": [[480, 720]], "frame": [49]}, "unknown key 'frame'"),
        ({"resolutions": [[480, 720]], "frames": [49], "batch_size": 0}, "batch_size is 0"),
        ({"resolutions": [[480, 720]], "frames": [49], "batch_sizes": {"49x512x512": 2}}, "names bucket '49x512x512'"),
        ({"resolutions": [[1024, 1024]], "token_budget": 1000}, "token_budget 1000 fits no frame count at 1024x1024"),
    ],
)
def test_invalid_specs_are_refused_naming_the_problem(data, message):
    with pytest.raises(CogtuneError, match="^buckets.yaml: ") as error:
        spec_of(**data)
    assert message in str(error.value)


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("resolutions: [[480, 720]]\nframes: [49\nbatch_size: 2\n")
    with pytest.raises(CogtuneError, match=r"b.yaml line \d+: not valid YAML"):
        load_bucket_spec(path)


def test_bad_resolution_flag():
    with pytest.raises(CogtuneError, match="expected FRAMESxHEIGHTxWIDTH"):
        bucket_spec_from_resolution("480x720")


def test_fixed_size_model_refuses_other_sizes_naming_bucket_and_native_size(tiny_models):
    model = open_model(tiny_models["5b-i2v"])
    frames, height, width = TINY_NATIVE["1.0"]
    check_buckets_for_model(bucket_spec_from_resolution(f"{frames}x{height}x{width}"), model)
    spec = spec_of(resolutions=[[height, width], [48, 48]], frames=[frames])
    with pytest.raises(CogtuneError) as error:
        check_buckets_for_model(spec, model)
    message = str(error.value)
    assert "bucket 9x48x48" in message and "native 9x32x48" in message and "CogVideoX-5b-I2V" in message
    assert message.startswith("buckets.yaml: ")


def test_fixed_size_check_covers_the_frame_count(tiny_models):
    """diffusers swaps the learned table for a sin-cos one at another frame count, without a word."""
    model = open_model(tiny_models["5b-i2v"])
    with pytest.raises(CogtuneError, match="bucket 17x32x48: .* native 9x32x48"):
        check_buckets_for_model(spec_of(resolutions=[[32, 48]], frames=[9, 17]), model)
    with pytest.raises(CogtuneError, match="^STORE: bucket 17x32x48"):
        check_buckets_for_model(bucket_spec_from_resolution("17x32x48"), model, where="STORE")


@pytest.mark.parametrize("slug", ["2b", "5b", "1.5-5b", "1.5-5b-i2v"])
def test_variants_without_learned_positions_take_any_size(tiny_models, slug):
    spec = spec_of(resolutions=[[512, 768], [256, 256]], frames=[17, 49])
    check_buckets_for_model(spec, open_model(tiny_models[slug]))


MIXED = dict(resolutions=[[480, 720], [720, 480], [512, 512]], frames=[17, 49])


def test_assignment_takes_nearest_aspect_then_largest_covered_frames():
    spec = spec_of(**MIXED)
    assert assign_bucket(1080, 1920, 100, spec) == Bucket(49, 480, 720)  # 16:9 is nearest 3:2
    assert assign_bucket(1920, 1080, 100, spec) == Bucket(49, 720, 480)
    assert assign_bucket(600, 640, 30, spec) == Bucket(17, 512, 512)
    assert assign_bucket(600, 640, 49, spec) == Bucket(49, 512, 512)
    assert assign_bucket(600, 640, 16, spec) is None


def test_aspect_distance_is_in_log_ratio_so_wide_and_tall_are_treated_alike():
    # 2.2:1 is nearer 4:1 than 1:1 in log ratio (0.60 vs 0.79); plain ratios would say 1:1 (1.2 vs 1.8 away).
    spec = spec_of(resolutions=[[512, 512], [256, 1024], [1024, 256]], frames=[17])
    assert assign_bucket(500, 1100, 17, spec) == Bucket(17, 256, 1024)
    assert assign_bucket(1100, 500, 17, spec) == Bucket(17, 1024, 256)


def test_images_take_the_one_frame_bucket_of_the_nearest_aspect():
    spec = spec_of(**MIXED)
    assert assign_bucket(1200, 800, 1, spec) == Bucket(1, 720, 480)
    assert assign_bucket(300, 300, 1, spec) == Bucket(1, 512, 512)


def test_same_aspect_prefers_no_upscaling_then_the_largest():
    spec = spec_of(resolutions=[[480, 720], [768, 1152]], frames=[49])
    assert assign_bucket(600, 900, 60, spec) == Bucket(49, 480, 720)
    assert assign_bucket(1080, 1620, 60, spec) == Bucket(49, 768, 1152)
    assert assign_bucket(320, 480, 60, spec) == Bucket(49, 480, 720)  # both upscale: the smaller does less


def test_same_aspect_under_a_token_budget_prefers_more_frames():
    spec = spec_of(resolutions=[[512, 512], [768, 768], [1024, 1024]], token_budget=13312)
    assert assign_bucket(1080, 1080, 100, spec) == Bucket(49, 512, 512)
    assert assign_bucket(1080, 1080, 20, spec) == Bucket(17, 768, 768)
    assert assign_bucket(1080, 1080, 12, spec) == Bucket(9, 1024, 1024)


sides = st.integers(1, 80).map(lambda n: 16 * n)
frame_counts = st.lists(st.sampled_from([9, 17, 25, 33, 49, 81]), min_size=1, max_size=4, unique=True)


@settings(max_examples=100, deadline=None)
@given(
    resolutions=st.lists(st.tuples(sides, sides), min_size=1, max_size=5, unique=True),
    frames=frame_counts,
    height=st.integers(16, 2000),
    width=st.integers(16, 2000),
    available=st.integers(0, 120),
)
def test_assignment_property(resolutions, frames, height, width, available):
    spec = spec_of(resolutions=[list(r) for r in resolutions], frames=frames)
    bucket = assign_bucket(height, width, available, spec)

    def distance(h: int, w: int) -> float:
        return abs(math.log(w / h) - math.log(width / height))

    nearest = min(distance(h, w) for h, w in resolutions)
    if available == 0 or (available > 1 and available < min(frames)):
        assert bucket is None
        return
    assert bucket is not None
    assert distance(bucket.height, bucket.width) <= nearest + 1e-9
    if available == 1:
        assert bucket.frames == 1
    else:
        assert bucket.frames <= available
        assert bucket.frames == max(f for f in frames if f <= available)
