"""Buckets: the (frames, height, width) shapes samples are encoded at, so each batch has one shape.

A `BucketSpec` comes from ``--buckets FILE`` (YAML or TOML) or ``--resolution 49x480x720`` (one bucket). Each
sample takes the resolution of the nearest aspect ratio, then the largest frame count it covers (Open-Sora's
rule); an image takes the 1-frame bucket of its nearest aspect ratio. With a cache, a sample's bucket is fixed
at encode time, so assignment is deterministic: no random drawing.

Shape rules, from the model: height and width are multiples of 16 (VAE 8x times patch 2); frame counts are
8N+1 for every variant (the VAE compresses time 4x to 2N+1 latent frames; 1.5's temporal patch of 2 pads the
odd latent count in the trainer, as its pipeline does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib
import yaml

from .errors import CogtuneError
from .variants import Variant

if TYPE_CHECKING:
    from .models import Model

VAE_SPATIAL = 8
VAE_TEMPORAL = 4
PATCH_SIZE = 2
SIZE_MULTIPLE = VAE_SPATIAL * PATCH_SIZE
"""Height and width must be multiples of this: one transformer token covers 16x16 pixels."""
FRAME_STEP = 8
"""Video frame counts are FRAME_STEP * N + 1."""

SPEC_KEYS = ("resolutions", "frames", "batch_size", "batch_sizes", "token_budget")


@dataclass(frozen=True, order=True)
class Bucket:
    """One shape samples are encoded at, in pixels."""

    frames: int
    """1 for an image bucket, else 8N+1."""
    height: int
    width: int

    @property
    def name(self) -> str:
        """``FxHxW``, e.g. ``49x480x720``: no dots, so it is safe as a store key."""
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def resolution(self) -> tuple[int, int]:
        return (self.height, self.width)

    @classmethod
    def parse(cls, text: str) -> Bucket:
        """The bucket named ``FxHxW``; raises ValueError for any other text."""
        parts = text.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"{text!r} is not FRAMESxHEIGHTxWIDTH")
        return cls(*(int(p) for p in parts))


@dataclass(frozen=True)
class BucketSpec:
    """The buckets a run may use and their batch sizes."""

    frames_by_resolution: dict[tuple[int, int], tuple[int, ...]]
    """(height, width) -> the video frame counts allowed there, ascending (one count under a token budget)."""
    batch_size: int = 1
    """Batch size of every bucket without an override."""
    batch_sizes: dict[str, int] = field(default_factory=dict)
    """Per-bucket batch sizes by bucket name (``49x480x720``)."""
    token_budget: int | None = None
    """Latent tokens per sample that fixed the frame count of each resolution; None where frames were listed."""
    source: str = ""
    """Where the spec came from (a file, or ``--resolution ...``), for messages."""

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        return list(self.frames_by_resolution)

    @property
    def buckets(self) -> list[Bucket]:
        """Every video bucket, sorted."""
        return sorted(Bucket(f, h, w) for (h, w), frames in self.frames_by_resolution.items() for f in frames)

    def batch_size_for(self, bucket: Bucket) -> int:
        return self.batch_sizes.get(bucket.name, self.batch_size)

    def to_json(self) -> dict[str, Any]:
        """The spec as recorded in store.json (`from_json` reads it back)."""
        return {
            "frames_by_resolution": [[h, w, list(f)] for (h, w), f in sorted(self.frames_by_resolution.items())],
            "batch_size": self.batch_size,
            "batch_sizes": dict(sorted(self.batch_sizes.items())),
            "token_budget": self.token_budget,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BucketSpec:
        return cls({(h, w): tuple(f) for h, w, f in data["frames_by_resolution"]}, data["batch_size"],
                   dict(data["batch_sizes"]), data["token_budget"], data["source"])


def is_valid_frame_count(frames: int) -> bool:
    """True for video frame counts the model takes: 8N+1 with N >= 1 (9, 17, ..., 49, ..., 81)."""
    return frames >= FRAME_STEP + 1 and (frames - 1) % FRAME_STEP == 0


def latent_tokens(frames: int, height: int, width: int, patch_size_t: int | None = None) -> int:
    """Transformer tokens of one sample: latent frames (divided by the temporal patch, padded) x H/16 x W/16."""
    latent_frames = (frames - 1) // VAE_TEMPORAL + 1
    if patch_size_t:
        latent_frames = math.ceil(latent_frames / patch_size_t)
    return latent_frames * (height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE)


def frames_within_budget(
    budget: int, height: int, width: int, patch_size_t: int | None = None, allowed: list[int] | None = None
) -> int | None:
    """The largest valid frame count (from `allowed`, or any 8N+1) whose tokens fit `budget`; None if none fits."""
    if allowed is None:
        # Tokens grow with frames, so count up until the budget is exceeded.
        allowed, frames = [], FRAME_STEP + 1
        while latent_tokens(frames, height, width, patch_size_t) <= budget:
            allowed.append(frames)
            frames += FRAME_STEP
    fitting = [f for f in allowed if latent_tokens(f, height, width, patch_size_t) <= budget]
    return max(fitting, default=None)


def load_bucket_spec(path: Path | str, variant: Variant | None = None) -> BucketSpec:
    """Read ``--buckets FILE`` (``.yaml``/``.yml`` or ``.toml``). `variant` sets how tokens count (1.5 patches time)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise CogtuneError(f"{path}: cannot read the bucket file ({e.strerror})") from None
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise CogtuneError(f"{path}: bucket file must be .yaml, .yml or .toml")
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else "?"
        raise CogtuneError(f"{path} line {line}: not valid YAML ({e.problem})") from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise CogtuneError(f"{path}: not valid {suffix[1:].upper()} ({e})") from None
    if not isinstance(data, Mapping):
        raise CogtuneError(f"{path}: expected a mapping with 'resolutions' and 'frames' (or 'token_budget')")
    return parse_bucket_spec(data, str(path), variant)


def bucket_spec_from_resolution(text: str, variant: Variant | None = None) -> BucketSpec:
    """The one-bucket spec of ``--resolution FxHxW``."""
    try:
        bucket = Bucket.parse(text)
    except ValueError:
        raise CogtuneError(f"--resolution {text!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 49x480x720") from None
    data = {"resolutions": [[bucket.height, bucket.width]], "frames": [bucket.frames]}
    return parse_bucket_spec(data, f"--resolution {text}", variant)


def parse_bucket_spec(data: Mapping[str, Any], source: str, variant: Variant | None = None) -> BucketSpec:
    """Validate a bucket mapping (as read from a file) into a `BucketSpec`; errors name `source`."""
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise CogtuneError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(SPEC_KEYS)})")
    resolutions = [_parse_resolution(entry, source) for entry in _list(data, "resolutions", source, required=True)]
    listed = [_positive_int(f, "frames", source) for f in _list(data, "frames", source)]
    for frames in listed:
        if not is_valid_frame_count(frames):
            raise CogtuneError(f"{source}: frame count {frames} is not 8N+1 (9, 17, 25, ..., 49, ..., 81)")
    listed = sorted(set(listed))
    budget = data.get("token_budget")
    patch_size_t = variant.patch_size_t if variant else None
    if budget is not None:
        budget = _positive_int(budget, "token_budget", source)
        frames_by_resolution = {}
        for height, width in resolutions:
            fixed = frames_within_budget(budget, height, width, patch_size_t, listed or None)
            if fixed is None:
                smallest = listed[0] if listed else FRAME_STEP + 1
                needed = latent_tokens(smallest, height, width, patch_size_t)
                raise CogtuneError(
                    f"{source}: token_budget {budget} fits no frame count at {height}x{width} "
                    f"({smallest} frames take {needed} tokens)"
                )
            frames_by_resolution[(height, width)] = (fixed,)
    elif not listed:
        raise CogtuneError(f"{source}: give 'frames' (e.g. [49]) or 'token_budget'")
    else:
        frames_by_resolution = {res: tuple(listed) for res in resolutions}
    batch_size = _positive_int(data.get("batch_size", 1), "batch_size", source)
    overrides = data.get("batch_sizes") or {}
    if not isinstance(overrides, Mapping):
        raise CogtuneError(f"{source}: batch_sizes must map bucket names (49x480x720) to batch sizes")
    # Image buckets (1 frame) may have their own batch size too.
    known = {Bucket(f, h, w).name for (h, w), counts in frames_by_resolution.items() for f in (1, *counts)}
    batch_sizes = {}
    for name, size in overrides.items():
        if str(name) not in known:
            raise CogtuneError(f"{source}: batch_sizes names bucket {name!r}, not one of {', '.join(sorted(known))}")
        batch_sizes[str(name)] = _positive_int(size, f"batch_sizes[{name}]", source)
    return BucketSpec(frames_by_resolution, batch_size, batch_sizes, budget, source)


def check_buckets_for_model(spec: BucketSpec, model: Model, where: str = "") -> None:
    """Refuse, before any work, a spec with a bucket the model cannot train at (`Model.check_size`); the error
    names `where` (default: the spec's source). Image buckets are not listed here: an image-to-video model, the
    only kind with a fixed size, skips images, and cogtrain checks every bucket a store holds."""
    for bucket in spec.buckets:
        model.check_size(bucket.frames, bucket.height, bucket.width, f"{where or spec.source}: bucket")


def assign_bucket(height: int, width: int, num_frames_available: int, spec: BucketSpec) -> Bucket | None:
    """The bucket of a sample of `height` x `width` with `num_frames_available` usable frames (1: an image).

    The resolution of the nearest aspect ratio (by log ratio), then the largest frame count it covers; among
    resolutions of the same aspect ratio, the one giving most frames, then the largest needing no upscaling
    (or, if all need it, the smallest). None where the sample is shorter than every frame bucket there.
    """
    if num_frames_available < 1:
        return None
    aspect = math.log(width / height)
    distance = {res: abs(math.log(res[1] / res[0]) - aspect) for res in spec.frames_by_resolution}
    nearest = min(distance.values())
    # Tolerance: two resolutions of one aspect ratio (480x720, 768x1152) differ in float rounding only.
    candidates = [res for res, d in distance.items() if d <= nearest + 1e-9]
    if num_frames_available == 1:
        options = [Bucket(1, h, w) for h, w in candidates]
    else:
        covered = [(f, h, w) for h, w in candidates for f in spec.frames_by_resolution[(h, w)]]
        options = [Bucket(f, h, w) for f, h, w in covered if f <= num_frames_available]
    if not options:
        return None

    def preference(bucket: Bucket) -> tuple[int, bool, int]:
        no_upscale = bucket.height <= height and bucket.width <= width
        area = bucket.height * bucket.width
        return (bucket.frames, no_upscale, area if no_upscale else -area)

    return max(options, key=preference)


def _parse_resolution(entry: Any, source: str) -> tuple[int, int]:
    if isinstance(entry, str):
        parts = entry.strip().lower().split("x")
        values = [int(p) for p in parts] if len(parts) == 2 and all(p.isdigit() for p in parts) else None
    elif isinstance(entry, list | tuple) and len(entry) == 2 and all(type(v) is int for v in entry):
        values = list(entry)
    else:
        values = None
    if values is None or min(values) < 1:
        raise CogtuneError(f"{source}: resolution {entry!r} is not [HEIGHT, WIDTH] or \"HEIGHTxWIDTH\"")
    height, width = values
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise CogtuneError(
            f"{source}: resolution {height}x{width}: height and width must be multiples of {SIZE_MULTIPLE} "
            f"(VAE {VAE_SPATIAL}x times patch {PATCH_SIZE})"
        )
    return height, width


def _list(data: Mapping[str, Any], key: str, source: str, required: bool = False) -> list:
    value = data.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not value:
        raise CogtuneError(f"{source}: {key!r} must be a non-empty list")
    return value


def _positive_int(value: Any, what: str, source: str) -> int:
    if type(value) is not int or value < 1:
        raise CogtuneError(f"{source}: {what} is {value!r}, expected a positive integer")
    return value
