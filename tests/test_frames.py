"""Clip planning (which source frames make each clip) and resizing to a bucket."""

from __future__ import annotations

import numpy as np
import pytest
from cogtune.preprocess.frames import (
    ClipWindow,
    FrameSampling,
    plan_clips,
    resize_to_bucket,
    usable_frames,
)
from cogtune.shared.errors import CogtuneError


def only_window(plan):
    assert plan.reason is None
    assert len(plan.windows) == 1
    return plan.windows[0]


def test_head_takes_the_largest_covered_bucket_from_frame_zero():
    window = only_window(plan_clips(60, 8.0, FrameSampling(), [9, 17, 49]))
    assert window == ClipWindow(start=0, stride=1.0, frames=49)
    assert window.indices == list(range(49))


def test_fps_resampling_24_to_16_takes_the_frame_on_screen_at_each_target_time():
    window = only_window(plan_clips(100, 24.0, FrameSampling(fps=16), [9, 17, 49]))
    assert window.frames == 49  # 67 frames at 16 fps are available
    assert window.indices[:9] == [0, 1, 3, 4, 6, 7, 9, 10, 12]
    assert window.indices[-1] == 72  # floor(48 * 1.5)


def test_fps_resampling_30_to_8_has_fractional_step():
    window = only_window(plan_clips(300, 30.0, FrameSampling(fps=8), [9]))
    assert window.stride == pytest.approx(3.75)
    assert window.indices == [0, 3, 7, 11, 15, 18, 22, 26, 30]


def test_ntsc_rate_resampling_stays_inside_the_video():
    # 29.97 fps to 8 fps: float products must never floor past the last frame.
    plan = plan_clips(200, 30000 / 1001, FrameSampling(fps=8, clips="sliding:9"), [9, 17, 49])
    assert plan.windows
    assert all(0 <= i < 200 for w in plan.windows for i in w.indices)
    assert plan.windows[0].frames == 49  # floor(199 / 3.746) + 1 = 54 usable


def test_stride_without_fps_takes_every_nth_frame():
    window = only_window(plan_clips(40, 24.0, FrameSampling(stride=2), [9, 17]))
    assert window.indices == list(range(0, 34, 2))


def test_a_source_slower_than_the_target_rate_is_not_upsampled():
    window = only_window(plan_clips(30, 8.0, FrameSampling(fps=16), [9, 17]))
    assert window.indices == list(range(17))


def test_skips_are_seconds_at_the_source_rate():
    sampling = FrameSampling(skip_start=1.0, skip_end=1.0)
    assert usable_frames(100, 24.0, sampling) == 52
    window = only_window(plan_clips(100, 24.0, sampling, [9, 17, 49]))
    assert window.indices == list(range(24, 73))


def test_uniform_spreads_k_clips_from_first_to_last_possible_start():
    plan = plan_clips(100, 8.0, FrameSampling(clips="uniform:3"), [49])
    assert [w.start for w in plan.windows] == [0, 26, 51]
    assert plan.windows[-1].indices[-1] == 99


def test_uniform_one_takes_the_middle():
    window = only_window(plan_clips(100, 8.0, FrameSampling(clips="uniform:1"), [49]))
    assert window.start == 25


def test_uniform_keeps_coinciding_clips_once():
    plan = plan_clips(50, 8.0, FrameSampling(clips="uniform:4"), [49])
    assert [w.start for w in plan.windows] == [0, 1]


def test_sliding_stride_counts_clip_frames_so_equal_to_length_is_back_to_back():
    plan = plan_clips(120, 8.0, FrameSampling(clips="sliding:49"), [49])
    assert [w.start for w in plan.windows] == [0, 49]  # a third would end at frame 146


def test_sliding_with_fps_resampling():
    plan = plan_clips(200, 24.0, FrameSampling(fps=12, clips="sliding:17"), [17])
    assert [w.start for w in plan.windows] == [0, 34, 68, 102, 136]
    assert plan.windows[0].indices == list(range(0, 33, 2))
    assert plan.windows[1].indices[0] == plan.windows[0].indices[-1] + 2  # no gap, no overlap


def test_overlapping_sliding_windows():
    plan = plan_clips(30, 8.0, FrameSampling(clips="sliding:4"), [17])
    assert [w.start for w in plan.windows] == [0, 4, 8, 12]


def test_short_source_gets_no_clips_and_a_reason():
    plan = plan_clips(20, 8.0, FrameSampling(), [49, 81])
    assert plan.windows == []
    assert "20 usable frames" in plan.reason and "49" in plan.reason


def test_skips_can_make_a_source_too_short():
    plan = plan_clips(60, 8.0, FrameSampling(skip_start=3.0, skip_end=3.0), [17])
    assert plan.windows == []
    assert plan.reason.startswith("12 usable frames")


def test_image_is_one_frame():
    window = only_window(plan_clips(1, 0.0, FrameSampling(fps=16, skip_start=1.0), [1]))
    assert window.indices == [0]


@pytest.mark.parametrize(
    "settings",
    [dict(clips="tail"), dict(clips="uniform:0"), dict(clips="sliding:x"), dict(fps=0), dict(stride=0), dict(skip_end=-1)],
)
def test_bad_sampling_settings_are_refused_up_front(settings):
    with pytest.raises(CogtuneError):
        FrameSampling(**settings)


def frame_with_square(height: int, width: int, side: int) -> np.ndarray:
    frame = np.zeros((1, height, width, 3), np.uint8)
    top, left = (height - side) // 2, (width - side) // 2
    frame[0, top : top + side, left : left + side] = 255
    return frame


def bright_extent(frame: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(frame[..., 0] > 127)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def test_crop_keeps_the_aspect_ratio():
    out = resize_to_bucket(frame_with_square(60, 120, 30), 32, 32, "crop")
    assert out.shape == (1, 32, 32, 3) and out.dtype == np.uint8
    height, width = bright_extent(out[0])
    assert height == width == 16  # 30 px scaled by 32/60
    assert (out[0, 0] == 0).all() and (out[0, :, 0] == 0).all()  # centre crop: the square stays centred


def test_stretch_distorts_the_aspect_ratio():
    out = resize_to_bucket(frame_with_square(60, 120, 30), 32, 32, "stretch")
    height, width = bright_extent(out[0])
    assert height == 16 and width == 8


def test_crop_of_a_portrait_source_cuts_top_and_bottom():
    frame = np.zeros((1, 96, 48, 3), np.uint8)
    frame[0, :16] = 255  # the top sixth is white
    out = resize_to_bucket(frame, 32, 32, "crop")  # scale to 64x32, keep rows 16..48
    assert (out[0, :, :, 0] <= 2).all()


def test_same_size_is_untouched_and_chunks_match_single_frames():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (20, 32, 48, 3), dtype=np.uint8)
    assert np.array_equal(resize_to_bucket(frames, 32, 48), frames)
    resized = resize_to_bucket(frames, 16, 16)
    assert np.array_equal(resized[17:18], resize_to_bucket(frames[17:18], 16, 16))
