"""Reading and writing video files: mp4 out through imageio's ffmpeg plugin, frames in through decord.

decord is the `decord2` distribution (FFmpeg 8 with AV1, HEVC, VP9, ProRes, ...; it turns frames upright as
their rotation metadata says). Images (png, jpg, webp, ...) read as 1-frame videos, so the rest of cogtune
handles one kind of thing. Every failure to read a file becomes a `CogtuneError` naming the file and a short
reason in cogtune's words; what decord and FFmpeg would print about it never reaches the console.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import CogtuneError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
"""File suffixes read with PIL as 1-frame videos (compared lower-case)."""

MP4_QUALITY = 8
"""imageio's quality scale (0-10, 10 best): high enough that small synthetic clips keep their colours."""

# FFmpeg's error codes as decord's messages print them: av_find_best_stream found a video stream but no decoder
# for its codec, or found no video stream at all.
AVERROR_DECODER_NOT_FOUND = "-1128613112"
AVERROR_STREAM_NOT_FOUND = "-1381258232"


class VideoInfo(NamedTuple):
    """What planning needs to know about a video without decoding all of it."""

    num_frames: int
    fps: float
    """Average frame rate; 0.0 for an image (it has no time axis)."""
    height: int
    width: int


def is_image(path: Path | str) -> bool:
    """True where `path` is read as a still image (by its suffix)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def write_video(path: Path | str, frames: np.ndarray, fps: float) -> None:
    """Write uint8 frames [F, H, W, 3] to an H.264 mp4 (yuv420p), atomically.

    The file appears under its final name only once complete: a reader or a killed run never sees half a video.
    H and W must be even (yuv420p halves the chroma planes).
    """
    import imageio

    path = Path(path)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video wants uint8 frames [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"write_video wants even height and width (yuv420p), got {frames.shape[1]}x{frames.shape[2]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the final suffix (ffmpeg picks the container from it); ffmpeg creates the file,
    # so it gets the usual permissions rather than mkstemp's owner-only ones.
    tmp = str(path.parent / f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        writer = imageio.get_writer(
            tmp,
            format="FFMPEG",
            mode="I",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            quality=MP4_QUALITY,
            macro_block_size=1,  # keep the exact size: no silent padding to multiples of 16
            ffmpeg_log_level="error",
        )
        with writer:
            for frame in frames:
                writer.append_data(frame)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_video_info(path: Path | str) -> VideoInfo:
    """Frame count, frame rate and size of a video (or of an image, as a 1-frame video)."""
    path = _check_file(path)
    if is_image(path):
        height, width = _read_image(path).shape[:2]
        return VideoInfo(1, 0.0, height, width)
    with _decoder_stderr() as log:
        reader = _open_video(path, log)
        try:
            first = reader.next().asnumpy()
        except Exception as e:
            raise CogtuneError(f"{path}: cannot decode the first frame ({_damaged(e)})") from None
        return VideoInfo(len(reader), float(reader.get_avg_fps()), first.shape[0], first.shape[1])


def read_frames(path: Path | str, indices: Sequence[int]) -> np.ndarray:
    """Decode the frames at `indices` (source frame numbers) as uint8 [N, H, W, 3]; an image answers index 0."""
    path = _check_file(path)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("read_frames needs at least one frame index")
    if is_image(path):
        image = _read_image(path)
        if any(i != 0 for i in indices):
            raise CogtuneError(f"{path}: an image has only frame 0, asked for frames {indices}")
        return np.repeat(image[None], len(indices), axis=0)
    with _decoder_stderr() as log:
        reader = _open_video(path, log)
        out_of_range = [i for i in indices if not 0 <= i < len(reader)]
        if out_of_range:
            raise CogtuneError(f"{path}: has {len(reader)} frames, asked for frame {out_of_range[0]}")
        try:
            probe = reader[indices[0]].asnumpy()
            if probe.shape[-1] == 3:
                return reader.get_batch(indices).asnumpy()
            # decord bug (dmlc/decord#336, still in decord2 3.4): at some widths (8, 16, 24, 48, 72, ...) it
            # returns each frame's padded rows as extra "channels" and get_batch fails; read frame by frame and
            # cut the row padding off.
            return np.stack([_unpad_rows(reader[i].asnumpy(), probe.shape[1]) for i in indices])
        except Exception as e:
            raise CogtuneError(f"{path}: cannot decode frames ({_damaged(e)})") from None


def _unpad_rows(frame: np.ndarray, width: int) -> np.ndarray:
    height = frame.shape[0]
    return frame.reshape(height, -1)[:, : width * 3].reshape(height, width, 3)


def _check_file(path: Path | str) -> Path:
    path = Path(path)
    if not path.exists():
        raise CogtuneError(f"{path}: file not found")
    if not path.is_file():
        raise CogtuneError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise CogtuneError(f"{path}: empty file (0 bytes)")
    return path


def _open_video(path: Path, log: _CapturedStderr):
    """A decord VideoReader of `path`, or a CogtuneError saying what the file is: a codec this decoder lacks,
    no video stream, or not a readable video (corrupt, truncated or not a video at all)."""
    decord = _decord()
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    except Exception as e:
        message = str(e)
        if AVERROR_DECODER_NOT_FOUND in message:
            codec = _stream_codec(path)
            raise CogtuneError(f"{path}: unsupported video codec {codec or '(unknown)'}: decord {decord.__version__}'s "
                               "FFmpeg has no decoder for it (re-encode it, e.g. to H.264)") from None
        if AVERROR_STREAM_NOT_FOUND in message:
            raise CogtuneError(f"{path}: no video stream (audio or data only)") from None
        # decord's exception says only "Error reading PATH..."; FFmpeg's reason is in the line it logged
        opening = re.search(r"ERROR opening: .*, (.+)", log.text())
        reason = f"FFmpeg: {opening.group(1).strip()}" if opening else _short(e)
        raise CogtuneError(f"{path}: not a readable video (corrupt, truncated or not a video; {reason})") from None
    if len(reader) < 1:
        raise CogtuneError(f"{path}: video has no frames")
    return reader


@functools.cache
def _decord():
    """The decord module, with FFmpeg's own log (av_log: "[mov,mp4,... @ 0x...] moov atom not found") silenced:
    cogtune reports each bad file in one line of its own."""
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    return decord


class _CapturedStderr:
    def __init__(self, file):
        self.file = file

    def text(self) -> str:
        self.file.seek(0)
        return self.file.read().decode(errors="replace")


# decord's own log lines ("[09:22:36] /project/src/video/video_reader.cc:86: ERROR opening: ...") and FFmpeg's
# ("[h264 @ 0x55e5fc09d100] ...", should one come before the level is set)
_DECODER_LINE = re.compile(r"^\[[\d:]+\] \S+\.(cc|h):\d+: |^\[[\w,-]+ @ 0x[0-9a-f]+\] ")
_STDERR_LOCK = threading.Lock()


@contextmanager
def _decoder_stderr() -> Iterator[_CapturedStderr]:
    """Point the process's stderr (fd 2) at a temporary file while decord works: its C++ log lines are written
    there and have no level to turn them off. Afterwards, what others wrote meanwhile goes on to stderr; decord's
    and FFmpeg's lines stay behind (the caller may read them for a reason). One capture at a time per process."""
    with _STDERR_LOCK, tempfile.TemporaryFile(buffering=0) as file:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(file.fileno(), 2)
        captured = _CapturedStderr(file)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            others = [line for line in captured.text().splitlines(keepends=True) if not _DECODER_LINE.match(line)]
            if others:
                os.write(2, "".join(others).encode())


def _stream_codec(path: Path) -> str | None:
    """The codec name of the first video stream of `path`, as the ffmpeg binary imageio-ffmpeg ships reads it
    (decord cannot open the file to say); None where it cannot tell."""
    import imageio_ffmpeg

    try:
        probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                               capture_output=True, text=True, errors="replace", timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"Stream #.*?: Video: (\w+)", probe.stderr)
    return found.group(1) if found else None


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            # Phones store rotation as EXIF metadata: apply it, or portrait photos train sideways.
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except Exception as e:
        raise CogtuneError(f"{path}: not a readable image ({_short(e)})") from None


# decord's messages start with a time and a C++ source line, sometimes several nested ("[t] a.cc:1: [t] b.cc:2: ...");
# a failed check goes on with its C++ condition and values before the words ("Check failed: f(x) >= 0 (-12 vs. 0) ...")
_DECORD_PREFIX = re.compile(r"^(\[[\d:]+\] \S+:\d+: )+(Check failed: (.*? \(\S+ vs\. \S+\) )?)?")


def _short(error: Exception) -> str:
    """A library's error as one short line: decord's messages start with a time and a C++ source path."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = _DECORD_PREFIX.sub("", lines[0]) if lines else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _damaged(error: Exception) -> str:
    """A decode failure of a file that opened: its data is damaged or cut short; decord's check as the detail."""
    return f"damaged or truncated data; decoder: {_short(error)}"
