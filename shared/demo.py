"""A synthetic demo dataset a tiny model can learn: coloured shapes moving over plain or gradient backgrounds.

Each clip's caption says exactly what is in it ("a red circle moving left to right over a blue background"),
in words the tiny models' tokenizer knows. Clips vary in size, aspect ratio, frame rate and length so that
bucketing, resampling and clip planning all have something to do. Same seed, same dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .atomic import atomic_path, atomic_write_text
from .video import write_video

Layout = Literal["txt", "json"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (245, 140, 20),
    "purple": (140, 40, 180),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left to right": (1, 0),
    "right to left": (-1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
"""Caption words -> (dx, dy) of the motion across the frame (y grows downwards)."""
SIZES = ((32, 48), (48, 32), (40, 40), (64, 96), (48, 80), (36, 64))
"""(height, width) of the clips: landscape, portrait and square, all even (yuv420p needs it)."""
FRAME_RATES = (8, 12, 16, 24)
MIN_FRAMES, MAX_FRAMES = 9, 60


@dataclass(frozen=True)
class DemoSample:
    """One file of the demo dataset and what it shows."""

    file_path: str
    """Path relative to the dataset folder, as the manifests list it."""
    text: str
    """The caption."""
    type: Literal["video", "image"]
    num_frames: int
    fps: int
    """Frame rate of a video; 0 for an image."""
    height: int
    width: int


def make_demo_dataset(out: Path | str, count: int = 8, seed: int = 0, layout: Layout = "txt") -> list[DemoSample]:
    """Write `count` clips (plus a few PNG images for layout ``json``) and the manifests to `out`.

    Layout ``txt``: ``videos/*.mp4``, ``prompts.txt`` and ``videos.txt``. Layout ``json``: the same videos,
    ``images/*.png`` and ``dataset.json`` (a list of {file_path, text, type, width, height}).
    Returns the samples in manifest order.
    """
    if layout not in ("txt", "json"):
        raise ValueError(f"layout must be 'txt' or 'json', got {layout!r}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    # Cycle through sizes and frame rates (from a seeded start) so even a small dataset has all of them.
    size_order = rng.permutation(len(SIZES))
    rate_offset = int(rng.integers(len(FRAME_RATES)))
    samples = []
    for i in range(count):
        height, width = SIZES[size_order[i % len(SIZES)]]
        fps = FRAME_RATES[(i + rate_offset) % len(FRAME_RATES)]
        # MIN..MAX frames at 8 fps, as long at the clip's own rate: sampled at the model's rate (8 or 16 fps,
        # cogprep's default) every clip still fills the smallest frame bucket
        num_frames = round((int(rng.integers(MIN_FRAMES, MAX_FRAMES + 1)) - 1) * fps / 8) + 1
        frames, caption = _render_clip(rng, num_frames, height, width)
        file_path = f"videos/clip_{i:03d}.mp4"
        write_video(out / file_path, frames, fps)
        samples.append(DemoSample(file_path, caption, "video", num_frames, fps, height, width))
    if layout == "txt":
        atomic_write_text(out / "prompts.txt", "".join(s.text + "\n" for s in samples))
        atomic_write_text(out / "videos.txt", "".join(s.file_path + "\n" for s in samples))
        return samples
    num_images = max(1, count // 4)
    for i in range(num_images):
        height, width = SIZES[size_order[(count + i) % len(SIZES)]]
        frames, caption = _render_clip(rng, 1, height, width)
        file_path = f"images/image_{i:03d}.png"
        _write_png(out / file_path, frames[0])
        # Spread the images among the videos so readers meet mixed kinds, not a tail of images.
        image = DemoSample(file_path, caption, "image", 1, 0, height, width)
        samples.insert((i + 1) * count // (num_images + 1) + i, image)
    manifest = [
        {"file_path": s.file_path, "text": s.text, "type": s.type, "width": s.width, "height": s.height}
        for s in samples
    ]
    atomic_write_text(out / "dataset.json", json.dumps(manifest, indent=1) + "\n")
    return samples


VALIDATION = "validation"
"""Folder of the validation set inside a demo dataset: prompts.txt, images.txt and the images."""


def make_validation_set(out: Path | str, count: int = 2, seed: int = 0, size: tuple[int, int] = (32, 48)) -> Path:
    """Write `count` validation prompts, each with the first frame of a clip it describes (what an image-to-video
    model starts from), to ``out/validation/``: ``prompts.txt``, ``images.txt`` (paths relative to it, as
    ``cogprep encode --validation-images`` reads them) and ``image_NNN.png``. Returns the folder."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    folder = Path(out) / VALIDATION
    # a seed of its own: the same dataset seed never repeats a training clip as a validation prompt
    rng = np.random.default_rng([seed, 1])
    prompts, images = [], []
    for i in range(count):
        frames, caption = _render_clip(rng, MIN_FRAMES, *size)
        name = f"image_{i:03d}.png"
        _write_png(folder / name, frames[0])
        prompts.append(caption)
        images.append(name)
    atomic_write_text(folder / "prompts.txt", "".join(p + "\n" for p in prompts))
    atomic_write_text(folder / "images.txt", "".join(name + "\n" for name in images))
    return folder


def _render_clip(rng: np.random.Generator, num_frames: int, height: int, width: int) -> tuple[np.ndarray, str]:
    """Frames [F, H, W, 3] of one shape crossing the frame (standing still when F is 1) and their caption."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    names = list(COLOURS)
    shape_colour = names.pop(rng.integers(len(names)))
    background_colour = names.pop(rng.integers(len(names)))
    gradient_colour = names.pop(rng.integers(len(names))) if rng.random() < 0.4 else None
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]

    background = _background(height, width, COLOURS[background_colour], COLOURS.get(gradient_colour))
    radius = max(4, min(height, width) // 4)
    dx, dy = DIRECTIONS[direction]
    # The cross-axis position is random; along the motion the shape travels edge to edge.
    cross_x = rng.uniform(radius, width - radius)
    cross_y = rng.uniform(radius, height - radius)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        progress = t / (num_frames - 1) if num_frames > 1 else 0.5
        cx = _along(progress, dx, width, radius) if dx else cross_x
        cy = _along(progress, dy, height, radius) if dy else cross_y
        frames[t] = background
        frames[t][_shape_mask(shape, xs - cx, ys - cy, radius)] = COLOURS[shape_colour]

    where = f"{background_colour} and {gradient_colour}" if gradient_colour else background_colour
    motion = f" moving {direction}" if num_frames > 1 else ""
    return frames, f"{_article(shape_colour)} {shape_colour} {shape}{motion} over {_article(where)} {where} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _along(progress: float, sign: int, extent: int, radius: int) -> float:
    """Centre of a shape `progress` (0..1) of the way across `extent` pixels, forwards or backwards."""
    travelled = radius + progress * (extent - 2 * radius)
    return travelled if sign > 0 else extent - travelled


def _background(
    height: int, width: int, colour: tuple[int, int, int], gradient_to: tuple[int, int, int] | None
) -> np.ndarray:
    """A plain background, or a left-to-right gradient from `colour` to `gradient_to`."""
    if gradient_to is None:
        return np.broadcast_to(np.array(colour, np.uint8), (height, width, 3))
    ramp = np.linspace(0.0, 1.0, width)[None, :, None]
    blend = (1 - ramp) * np.array(colour) + ramp * np.array(gradient_to)
    return np.broadcast_to(blend, (height, width, 3)).round().astype(np.uint8)


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Pixels inside `shape` centred at the origin of the offsets `x`, `y`."""
    if shape == "circle":
        return x**2 + y**2 <= radius**2
    if shape == "square":
        half = 0.85 * radius  # same area as the circle, roughly: neither shape dominates the loss
        return (np.abs(x) <= half) & (np.abs(y) <= half)
    # Triangle pointing up: apex at the top, base of width 2 * radius at the bottom.
    return (y >= -radius) & (y <= radius) & (np.abs(x) <= (y + radius) / 2)


def _write_png(path: Path, frame: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(frame).save(tmp, format="PNG")


__all__ = ["DemoSample", "make_demo_dataset"]
