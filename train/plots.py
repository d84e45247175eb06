"""Pictures of a run, drawn with Pillow (already a dependency of diffusers and of cogprep's previews; a plotting
library would add tens of MB for two charts): RUN/plots/loss.png, and a contact sheet per validation round.

The loss plot shows the training loss raw (light) and smoothed (dark), the held-out loss (red dots) on the same
axis, and the learning rate (green, its own scale on the right) against the step.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..shared.atomic import atomic_write_bytes

PLOT = Path("plots") / "loss.png"
SIZE = (960, 480)
MARGIN = (70, 30, 70, 50)  # left, top, right, bottom
SMOOTHING = 0.9
"""Weight of the running average in the smoothed training loss (an exponential moving average)."""


def write_loss_plot(run: Path) -> Path | None:
    """Draw RUN/plots/loss.png from losses.jsonl; None when no step is logged yet."""
    losses = Path(run) / "losses.jsonl"
    entries = [json.loads(line) for line in losses.read_text().splitlines() if line] if losses.exists() else []
    if not entries:
        return None
    steps = [e["step"] for e in entries]
    train = [e["loss"] for e in entries]
    evaluated = [(e["step"], e["eval_loss"]) for e in entries if "eval_loss" in e]
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    x_of = _scale(min(steps), max(steps), MARGIN[0], SIZE[0] - MARGIN[2])
    values = train + [v for _, v in evaluated]
    low, high = min(values), max(values)
    y_of = _scale(low, high, SIZE[1] - MARGIN[3], MARGIN[1])
    _axes(draw, font, (min(steps), max(steps)), (low, high), x_of, y_of)
    _line(draw, [(x_of(s), y_of(v)) for s, v in zip(steps, train)], (200, 200, 220))
    _line(draw, [(x_of(s), y_of(v)) for s, v in zip(steps, _smoothed(train))], (30, 60, 160), width=2)
    for s, v in evaluated:
        x, y = x_of(s), y_of(v)
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(200, 30, 30))
    lrs = [e.get("lr", 0.0) for e in entries]
    lr_of = _scale(0.0, max(lrs) or 1.0, SIZE[1] - MARGIN[3], MARGIN[1])
    _line(draw, [(x_of(s), lr_of(v)) for s, v in zip(steps, lrs)], (40, 150, 60))
    draw.text((SIZE[0] - MARGIN[2] + 5, MARGIN[1]), f"lr {max(lrs):.1e}", fill=(40, 150, 60), font=font)
    legend = "training loss (light: raw, dark: smoothed)   held-out loss (red)   learning rate (green)"
    draw.text((MARGIN[0], 8), legend, fill="black", font=font)
    return _save(image, Path(run) / PLOT)


def write_contact_sheet(path: Path, videos: list[np.ndarray], captions: list[str], frames_per_row: int = 4) -> Path:
    """One row per video (uint8 [F, H, W, 3]): `frames_per_row` frames across the clip, its caption above."""
    font = ImageFont.load_default()
    height, width = videos[0].shape[1:3]
    caption_height = 16
    sheet = Image.new("RGB", (width * frames_per_row, (height + caption_height) * len(videos)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (video, caption) in enumerate(zip(videos, captions)):
        top = row * (height + caption_height)
        draw.text((2, top + 2), caption[: width * frames_per_row // 6], fill="black", font=font)
        picks = np.linspace(0, len(video) - 1, frames_per_row).round().astype(int)
        for column, index in enumerate(picks):
            sheet.paste(Image.fromarray(video[index]), (column * width, top + caption_height))
    return _save(sheet, Path(path))


def _save(image: Image.Image, path: Path) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _scale(low: float, high: float, start: float, end: float):
    span = (high - low) or 1.0
    return lambda value: start + (value - low) / span * (end - start)


def _smoothed(values: list[float]) -> list[float]:
    out, average = [], None
    for value in values:
        if math.isfinite(value):
            average = value if average is None else SMOOTHING * average + (1 - SMOOTHING) * value
        out.append(average if average is not None else value)
    return out


def _line(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], color, width: int = 1) -> None:
    points = [p for p in points if all(map(math.isfinite, p))]
    if len(points) > 1:
        draw.line(points, fill=color, width=width)
    elif points:
        x, y = points[0]
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)


def _axes(draw, font, steps: tuple[int, int], losses: tuple[float, float], x_of, y_of) -> None:
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        value = losses[0] + fraction * (losses[1] - losses[0])
        y = y_of(value)
        draw.line((left - 4, y, left, y), fill=(120, 120, 120))
        draw.text((4, y - 6), f"{value:.4g}", fill="black", font=font)
        step = round(steps[0] + fraction * (steps[1] - steps[0]))
        x = x_of(step)
        draw.line((x, bottom, x, bottom + 4), fill=(120, 120, 120))
        draw.text((x - 10, bottom + 8), str(step), fill="black", font=font)
    draw.text(((left + right) // 2 - 10, bottom + 26), "step", fill="black", font=font)
