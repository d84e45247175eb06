"""Which source frames make each clip, and how frames are resized to a bucket: pure functions, no decoding.

Sampling works in source frame numbers. A clip of F frames at a (possibly fractional) step s from frame
`start` takes frames ``start + floor(i * s)``: the frame on screen at each target time. Resampling to a target
frame rate sets s = source_fps / target_fps (times `stride`); a source slower than the target is never
upsampled (s is at least `stride`), since repeated frames would teach the model to stutter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..shared.errors import CogtuneError

ResizeMode = Literal["crop", "stretch"]
ClipsKind = Literal["head", "uniform", "sliding"]

_EPS = 1e-9
"""Keeps float products like 3 * 1.5 from flooring to the frame below."""
RESIZE_CHUNK = 16
"""Frames resized at once: bounds the float copy of a long 1080p source to a few hundred MB."""


@dataclass(frozen=True)
class FrameSampling:
    """How clips are cut from a source video (the cogprep frame options)."""

    fps: float | None = None
    """Target frame rate to resample to; None keeps the source's rate (cogprep's --fps: see `sampling_fps`)."""
    stride: int = field(default=1, metadata={"option": {"min": 1}})
    """Take every N-th frame (after fps resampling)."""
    skip_start: float = field(default=0.0, metadata={"option": {"min": 0.0}})
    """Seconds to skip at the start of each video (intros, fades)."""
    skip_end: float = field(default=0.0, metadata={"option": {"min": 0.0}})
    """Seconds to skip at the end of each video (outros, credits)."""
    clips: str = "head"
    """Clips per video: head (one clip from the start), uniform:K (K clips spread evenly over the video) or
    sliding:S (a clip every S clip frames; S = the clip length gives back-to-back clips)."""

    def __post_init__(self) -> None:
        # Refuse bad settings when they are given, not at the first video.
        if self.fps is not None and not self.fps > 0:
            raise CogtuneError(f"frame sampling: fps must be positive, got {self.fps}")
        if self.stride < 1:
            raise CogtuneError(f"frame sampling: stride must be at least 1, got {self.stride}")
        if self.skip_start < 0 or self.skip_end < 0:
            raise CogtuneError(f"frame sampling: skips must not be negative, got {self.skip_start}, {self.skip_end}")
        parse_clips(self.clips)

    @property
    def clips_mode(self) -> tuple[ClipsKind, int]:
        return parse_clips(self.clips)


def parse_clips(text: str) -> tuple[ClipsKind, int]:
    """(``head``, 1), (``uniform``, K) or (``sliding``, S) from ``head``, ``uniform:K`` or ``sliding:S``."""
    kind, _, number = text.partition(":")
    if kind == "head" and not number:
        return "head", 1
    if kind in ("uniform", "sliding") and number.isdigit() and int(number) >= 1:
        return kind, int(number)  # type: ignore[return-value]
    raise CogtuneError(f"clips {text!r}: expected head, uniform:K or sliding:STRIDE (K, STRIDE >= 1)")


@dataclass(frozen=True)
class ClipWindow:
    """One clip, in source frame numbers."""

    start: int
    """First source frame."""
    stride: float
    """Source frames between consecutive clip frames (fractional when resampling the frame rate)."""
    frames: int
    """Clip length: a frame bucket's count."""

    @property
    def indices(self) -> list[int]:
        """The exact source frames of the clip."""
        return [self.start + math.floor(i * self.stride + _EPS) for i in range(self.frames)]


@dataclass(frozen=True)
class ClipPlan:
    """The clips of one source, or why there are none."""

    windows: list[ClipWindow]
    reason: str | None = None
    """Why `windows` is empty (too short for every frame bucket); None when there are clips."""


def source_step(source_fps: float, sampling: FrameSampling) -> float:
    """Source frames between consecutive sampled frames."""
    if sampling.fps is None or source_fps <= 0:
        return float(sampling.stride)
    return sampling.stride * max(1.0, source_fps / sampling.fps)


def usable_range(num_frames: int, source_fps: float, sampling: FrameSampling) -> tuple[int, int]:
    """Source frames [first, end) left after the skips."""
    first = round(sampling.skip_start * source_fps)
    end = num_frames - round(sampling.skip_end * source_fps)
    return first, max(first, end)


def usable_frames(num_frames: int, source_fps: float, sampling: FrameSampling) -> int:
    """How many frames a clip could have at most: the sampled frames between the skips."""
    first, end = usable_range(num_frames, source_fps, sampling)
    if end <= first:
        return 0
    return math.floor((end - 1 - first) / source_step(source_fps, sampling) + _EPS) + 1


def plan_clips(num_frames: int, source_fps: float, sampling: FrameSampling, frame_buckets: list[int]) -> ClipPlan:
    """The clip windows of a source of `num_frames` at `source_fps`.

    Every clip has the largest count in `frame_buckets` that the usable frames cover; a source shorter than
    every frame bucket gets no clips and a reason.
    """
    available = usable_frames(num_frames, source_fps, sampling)
    covered = [f for f in frame_buckets if f <= available]
    if not covered:
        rate = f" at {source_fps / source_step(source_fps, sampling):g} fps" if source_fps > 0 else ""
        shortage = f"fewer than the smallest frame bucket ({min(frame_buckets)})"
        return ClipPlan([], f"{available} usable frames{rate} (of {num_frames}), {shortage}")
    frames = max(covered)
    step = source_step(source_fps, sampling)
    first, end = usable_range(num_frames, source_fps, sampling)
    last_start = end - 1 - math.floor((frames - 1) * step + _EPS)
    kind, number = sampling.clips_mode
    if kind == "head":
        starts = [first]
    elif kind == "uniform":
        if number == 1:
            starts = [first + (last_start - first) // 2]
        else:
            starts = [first + round(j * (last_start - first) / (number - 1)) for j in range(number)]
    else:
        starts = []
        while (start := first + math.floor(len(starts) * number * step + _EPS)) <= last_start:
            starts.append(start)
    # A source barely longer than the clip gives uniform:K coinciding starts: keep each clip once.
    return ClipPlan([ClipWindow(s, step, frames) for s in dict.fromkeys(starts)])


def resize_to_bucket(frames: np.ndarray, height: int, width: int, mode: ResizeMode = "crop") -> np.ndarray:
    """Resize uint8 frames [N, H, W, 3] to [N, height, width, 3] (uint8).

    ``crop`` scales to cover the bucket and cuts the centre out, keeping the aspect ratio; ``stretch`` scales
    each axis separately (the THUDM default), distorting it. Bilinear with antialiasing, so downscaling does
    not alias.
    """
    import torch
    import torch.nn.functional as F

    if mode not in ("crop", "stretch"):
        raise ValueError(f"resize mode must be 'crop' or 'stretch', got {mode!r}")
    count, source_h, source_w, _ = frames.shape
    if mode == "crop":
        scale = max(height / source_h, width / source_w)
        resized_h, resized_w = max(height, round(source_h * scale)), max(width, round(source_w * scale))
    else:
        resized_h, resized_w = height, width
    top, left = (resized_h - height) // 2, (resized_w - width) // 2
    out = np.empty((count, height, width, 3), np.uint8)
    for at in range(0, count, RESIZE_CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(frames[at : at + RESIZE_CHUNK])).permute(0, 3, 1, 2).float()
        if (resized_h, resized_w) != (source_h, source_w):
            chunk = F.interpolate(chunk, (resized_h, resized_w), mode="bilinear", antialias=True, align_corners=False)
        chunk = chunk[:, :, top : top + height, left : left + width]
        out[at : at + RESIZE_CHUNK] = chunk.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out
