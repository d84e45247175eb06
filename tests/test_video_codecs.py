"""What cogtune's reader (decord2) decodes: a codec matrix made here with the ffmpeg binary imageio-ffmpeg ships,
each file checked against ffmpeg's own decode of it; and files it cannot decode, each reported as what it is
(unsupported codec, no video stream, corrupt or truncated) in one line, with nothing from FFmpeg or decord on
the process's stderr."""

from __future__ import annotations

import math
import os
import re
import subprocess
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from cogtune.preprocess.frames import FrameSampling, plan_clips
from cogtune.shared.errors import CogtuneError
from cogtune.shared.video import _decoder_stderr, read_frames, read_video_info

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
HEIGHT, WIDTH, BLOCK = 64, 96, 16
ID_BITS = WIDTH // BLOCK
"""Each frame carries its number in its top band: 6 blocks of 16x16, white for a 1 bit (frames 0 to 63)."""

MAX_MEAN_ABS_DIFF_VS_FFMPEG = 1.0
"""Tolerance against ffmpeg's own decode of the same file: mean absolute difference per frame, on 0-255 RGB.
Both are FFmpeg decoders with swscale's YUV to RGB, so they agree to a rounding (0.0 on the development machine)."""
MAX_MEAN_ABS_DIFF_VS_SOURCE = 20.0
"""A sanity bound against the frames that were encoded (lossy codecs at small sizes), so that both decoders
agreeing on something wrong (sideways, shifted colours) cannot pass."""

# A line FFmpeg ("[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55e5fc09d100] moov atom not found") or decord
# ("[09:22:36] /project/src/video/video_reader.cc:86: ERROR opening: ...") writes on its own.
DECODER_NOISE = re.compile(r"@ 0x[0-9a-f]+\]|\.cc:\d+|moov atom|Invalid data found")


def moving_pattern(num_frames: int) -> np.ndarray:
    """A colour gradient scrolling sideways, a white square moving across it, and each frame's number in the
    top band."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    frames = np.empty((num_frames, HEIGHT, WIDTH, 3), np.uint8)
    for t in range(num_frames):
        frames[t, ..., 0] = (x * 255 // WIDTH + 4 * t) % 256
        frames[t, ..., 1] = y * 255 // HEIGHT
        frames[t, ..., 2] = 128
        left = BLOCK + (2 * t) % (WIDTH - 2 * BLOCK)
        frames[t, 24:40, left : left + 16] = 255
        for bit in range(ID_BITS):
            frames[t, :BLOCK, bit * BLOCK : (bit + 1) * BLOCK] = 255 if (t >> bit) & 1 else 0
    return frames


def frame_ids(frames: np.ndarray) -> list[int]:
    """The frame numbers written by `moving_pattern`, read back from each block's centre."""
    centres = frames[:, 4 : BLOCK - 4].reshape(len(frames), BLOCK - 8, ID_BITS, BLOCK, 3)[:, :, :, 4 : BLOCK - 4]
    bits = centres.mean(axis=(1, 3, 4)) > 128
    return [int(sum(1 << b for b in range(ID_BITS) if row[b])) for row in bits]


def encoders() -> set[str]:
    listing = subprocess.run([FFMPEG, "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    return {m.group(1) for m in re.finditer(r"^ [VAS][\w.]{5} (\S+)", listing, re.M)}


ENCODERS = encoders()
AV1_ENCODERS = {  # any one of them: which this ffmpeg build has varies by platform
    "libaom-av1": ["-cpu-used", "8", "-crf", "30"],
    "libsvtav1": ["-preset", "10", "-svtav1-params", "verbosity=0"],
    "librav1e": ["-speed", "10"],
}


def av1_encoder() -> tuple[str, list[str]] | None:
    return next(((name, args) for name, args in AV1_ENCODERS.items() if name in ENCODERS), None)


def encode(path: Path, frames: np.ndarray, rate: str, codec: str, *args: str) -> Path:
    """Encode uint8 RGB frames with ffmpeg at frame rate `rate` (an integer or a fraction like 24000/1001)."""
    if codec not in ENCODERS:
        pytest.skip(f"the ffmpeg of imageio-ffmpeg ({FFMPEG}) has no {codec} encoder")
    n, h, w, _ = frames.shape
    subprocess.run([FFMPEG, "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", rate,
                    "-i", "-", "-c:v", codec, *args, str(path)], input=frames.tobytes(), capture_output=True,
                   check=True)
    return path


def ffmpeg_decode(path: Path, height: int, width: int) -> np.ndarray:
    """Every frame as ffmpeg itself decodes it (rotation metadata applied, as a player shows it), RGB uint8."""
    raw = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-fps_mode", "passthrough", "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    assert len(raw) % (height * width * 3) == 0, "ffmpeg decodes another frame size"
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


X264 = ["-preset", "ultrafast", "-pix_fmt", "yuv420p"]
MATRIX = {  # name: (file suffix, frame rate, frames, encoder, its options)
    "vp9": (".webm", "30", 30, "libvpx-vp9", ["-deadline", "realtime", "-cpu-used", "8", "-pix_fmt", "yuv420p"]),
    "hevc-8bit": (".mp4", "30", 30, "libx265", ["-preset", "ultrafast", "-pix_fmt", "yuv420p",
                                                  "-x265-params", "log-level=error"]),
    "hevc-10bit": (".mp4", "30", 30, "libx265", ["-preset", "ultrafast", "-pix_fmt", "yuv420p10le",
                                                   "-x265-params", "log-level=error"]),
    "h264-yuv444": (".mp4", "30", 30, "libx264", ["-preset", "ultrafast", "-pix_fmt", "yuv444p"]),
    "mpeg4": (".avi", "30", 30, "mpeg4", ["-q:v", "3"]),
    "prores": (".mov", "30", 30, "prores_ks", ["-profile:v", "0"]),
    "h264-60fps": (".mkv", "60", 60, "libx264", X264),
    "h264-23.976fps": (".mov", "24000/1001", 30, "libx264", X264),
}


def check_decodes_as_ffmpeg(path: Path, source: np.ndarray, rate: str) -> np.ndarray:
    info = read_video_info(path)
    assert info.num_frames == len(source)
    assert info.fps == pytest.approx(float(Fraction(rate)), rel=1e-6)
    frames = read_frames(path, range(info.num_frames))
    assert frames.shape == (len(source), info.height, info.width, 3)
    reference = ffmpeg_decode(path, info.height, info.width)
    assert len(reference) == len(frames)
    worst = max(mean_abs_diff(a, b) for a, b in zip(frames, reference))
    assert worst <= MAX_MEAN_ABS_DIFF_VS_FFMPEG, f"{path.name}: {worst:.2f} from ffmpeg's decode"
    return frames


@pytest.mark.parametrize("name", list(MATRIX))
def test_codec_decodes_as_ffmpeg_does(tmp_path, capfd, name):
    suffix, rate, count, codec, args = MATRIX[name]
    source = moving_pattern(count)
    path = encode(tmp_path / f"{name}{suffix}", source, rate, codec, *args)
    frames = check_decodes_as_ffmpeg(path, source, rate)
    assert (frames.shape[1], frames.shape[2]) == (HEIGHT, WIDTH)
    assert frame_ids(frames) == list(range(count))  # every frame once, in order: none dropped or repeated
    assert mean_abs_diff(frames, source) <= MAX_MEAN_ABS_DIFF_VS_SOURCE
    assert not DECODER_NOISE.search(capfd.readouterr().err)


def test_av1_decodes_as_ffmpeg_does(tmp_path, capfd):
    """The old decord 0.6 skipped AV1 mp4s as corrupt (its FFmpeg had no AV1 decoder); decord2 has dav1d."""
    found = av1_encoder()
    if found is None:
        pytest.skip(f"the ffmpeg of imageio-ffmpeg ({FFMPEG}) has none of the AV1 encoders {sorted(AV1_ENCODERS)}")
    codec, args = found
    source = moving_pattern(30)
    path = encode(tmp_path / "av1.mp4", source, "30", codec, *args, "-pix_fmt", "yuv420p")
    frames = check_decodes_as_ffmpeg(path, source, "30")
    assert frame_ids(frames) == list(range(30))
    assert mean_abs_diff(frames, source) <= MAX_MEAN_ABS_DIFF_VS_SOURCE
    assert not DECODER_NOISE.search(capfd.readouterr().err)


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotation_metadata_gives_upright_frames(tmp_path, degrees):
    """A phone clip stores its frames sideways with a display matrix: cogtune reads them as a player shows them
    (ffmpeg's -display_rotation sets a counter-clockwise rotation, what a portrait phone video carries)."""
    source = moving_pattern(12)
    plain = encode(tmp_path / "plain.mp4", source, "30", "libx264", *X264)
    path = tmp_path / f"rotated{degrees}.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-y", "-display_rotation", str(degrees), "-i", str(plain), "-c", "copy",
                    str(path)], capture_output=True, check=True)
    frames = check_decodes_as_ffmpeg(path, source, "30")
    upright = np.rot90(source, k=degrees // 90, axes=(1, 2))
    assert frames.shape == upright.shape
    assert mean_abs_diff(frames, upright) <= MAX_MEAN_ABS_DIFF_VS_SOURCE
    assert mean_abs_diff(frames, upright) < mean_abs_diff(frames, np.rot90(upright, k=2, axes=(1, 2)))


@pytest.mark.parametrize(("name", "target_fps", "frames_in_clip"), [("h264-60fps", 8, 5), ("h264-23.976fps", 8, 9)])
def test_frame_rate_resampling_picks_the_frame_on_screen(tmp_path, name, target_fps, frames_in_clip):
    """Sampled at 8 fps, the clip's frame j is the source frame on screen at time j / 8."""
    suffix, rate, count, codec, args = MATRIX[name]
    path = encode(tmp_path / f"{name}{suffix}", moving_pattern(count), rate, codec, *args)
    info = read_video_info(path)
    [window] = plan_clips(info.num_frames, info.fps, FrameSampling(fps=target_fps), [frames_in_clip]).windows
    shown = frame_ids(read_frames(path, window.indices))
    source_fps = Fraction(rate)
    for j, frame in enumerate(shown):
        t = Fraction(j, target_fps)
        assert frame / source_fps <= t < (frame + 1) / source_fps, f"at {float(t):.3f} s frame {frame} is not shown"
    assert shown == [math.floor(j * source_fps / target_fps) for j in range(frames_in_clip)]


# ---------------------------------------------------------------------------------------------------------
# files that cannot be decoded: what each is, in one line, and nothing on stderr


def assert_one_line_error(path: Path, capfd, *parts: str) -> str:
    for read in (read_video_info, lambda p: read_frames(p, [0])):
        with pytest.raises(CogtuneError) as error:
            read(path)
        message = str(error.value)
        assert message.startswith(f"{path}: ") and "\n" not in message
        for part in parts:
            assert part in message, f"{part!r} not in {message!r}"
    err = capfd.readouterr().err
    assert not DECODER_NOISE.search(err), f"decoder output reached stderr:\n{err}"
    return message


def test_unsupported_codec_is_named(tmp_path, capfd):
    """AVS2 (China's broadcast codec): this ffmpeg encodes it (libxavs2), decord2's FFmpeg has no decoder."""
    path = encode(tmp_path / "avs2.ts", moving_pattern(10), "30", "libxavs2", "-pix_fmt", "yuv420p")
    message = assert_one_line_error(path, capfd, "unsupported video codec avs2", "re-encode it")
    assert "corrupt" not in message


def test_audio_only_file_has_no_video_stream(tmp_path, capfd):
    path = tmp_path / "sound.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac", str(path)],
                   capture_output=True, check=True)
    assert_one_line_error(path, capfd, "no video stream")


def test_truncated_file_is_reported_as_corrupt_or_truncated(tmp_path, capfd):
    """Cut in half, an mp4 whose index (moov) is at its end cannot be opened at all ("moov atom not found", in
    FFmpeg's words on stderr, which must not appear); one whose index comes first opens and fails on the frames
    that are gone."""
    whole = encode(tmp_path / "whole.mp4", moving_pattern(30), "30", "libx264", *X264)
    data = whole.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    assert_one_line_error(cut, capfd, "not a readable video (corrupt, truncated or not a video; FFmpeg: Invalid data")

    faststart = tmp_path / "faststart.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-y", "-i", str(whole), "-c", "copy", "-movflags", "+faststart",
                    str(faststart)], capture_output=True, check=True)
    data = faststart.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CogtuneError) as error:
        read_frames(cut, range(read_video_info(cut).num_frames))
    message = str(error.value)
    assert "truncated" in message and "\n" not in message and ".cc:" not in message
    assert not DECODER_NOISE.search(capfd.readouterr().err)


def test_other_output_written_while_decoding_still_reaches_stderr(capfd):
    """The capture around decord keeps decord's and FFmpeg's lines only: what anything else writes meanwhile
    (another thread's warning) goes on to stderr."""
    with _decoder_stderr() as log:
        os.write(2, b"[h264 @ 0x55e5fc09d100] Invalid NAL unit size\n")
        os.write(2, b"a warning of someone else\n")
        assert "Invalid NAL" in log.text()
    assert capfd.readouterr().err == "a warning of someone else\n"
