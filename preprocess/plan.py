"""Planning an encode: which samples the dataset holds now, what the store already has, what must be encoded.

Every cached item has a content key, so planning is a set difference and never guesses:

- video item key: (video content hash [+ conditioning image hash], clip window, bucket, resize mode, frame
  sampling, VAE fingerprint, storage dtype, I2V noise variants and seed);
- text item key: (final caption, T5 + tokenizer fingerprint, max length, storage dtype).

An item is reusable when the current index points at it, or when a closed shard left by a killed run holds it.
File content hashes are trusted while (size, mtime) is unchanged, and each video's probe (frame count, fps,
size) is remembered by content hash, so a no-op re-run opens no video. `cogprep status` is this module alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..shared import store as S
from ..shared.atomic import atomic_write_text
from ..shared.buckets import Bucket, BucketSpec, assign_bucket
from ..shared.errors import CogtuneError
from ..shared.fingerprint import FileHashes, hash_json
from ..shared.store import CACHE_DIR
from ..shared.variants import get_variant
from ..shared.video import read_video_info
from .datasets import BadItem, Dataset, DatasetItem, read_dataset
from .frames import ClipWindow, FrameSampling, plan_clips, usable_frames

INPUT_ERRORS = (CogtuneError, OSError)
"""What a damaged, missing or unreadable input file raises (shared/video.py turns every decoder error into a
`CogtuneError`): such an item is skipped and reported. Any other exception is a bug in cogtune and propagates."""
IMAGE_FOR_I2V = "image for image-to-video"
"""Why an image-to-video model skips image entries (the summary counts skipped items by this phrase)."""


@dataclass(frozen=True)
class EncodeSettings:
    """Everything that changes what cogprep caches; stored in store.json and part of every content key."""

    buckets: dict[str, Any]
    """The bucket spec as given (file contents or --resolution), normalised to JSON."""
    sampling: FrameSampling
    resize: str = "crop"
    """``crop``: cover then centre crop (keeps aspect); ``stretch``: plain resize."""
    dtype: str = "bfloat16"
    """Storage dtype of latents and embeddings."""
    image_noise_variants: int = 0
    """I2V: noise-augmented encodings of the conditioning image cached per clip (0 for T2V models)."""
    seed: int = 0
    """Seeds the I2V noise augmentation (per item, from its key)."""
    text_length: int = 226

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["sampling"] = asdict(self.sampling)
        return out


@dataclass(frozen=True)
class VideoJob:
    """One video item to encode: a clip of a source at a bucket."""

    key: str
    path: Path
    kind: str
    image: Path | None
    window: ClipWindow
    bucket: Bucket


@dataclass
class Plan:
    samples: list[dict[str, Any]]
    """Every sample of the dataset as an index row without member locations, in dataset order."""
    video_jobs: dict[str, VideoJob]
    """Video items no shard holds yet, by key."""
    text_jobs: dict[str, str]
    """Text items no shard holds yet: key -> caption."""
    video_locations: dict[str, dict[str, S.Location]]
    """Known video items: key -> {member: Location}."""
    text_locations: dict[str, tuple[S.Location, int]]
    """Known text items: key -> (Location, token count)."""
    bad: list[BadItem]
    changes: dict[str, list[str]] = field(default_factory=dict)
    """Sources by what an encode does to them: new, changed, removed, unchanged."""
    caches: list[Any] = field(default_factory=list, repr=False)
    """The file hash and probe caches planning filled (see `save_caches`)."""

    def save_caches(self) -> None:
        """Write the file hash and probe caches into the store's cache folder."""
        for cache in self.caches:
            cache.save()

    @property
    def stale(self) -> bool:
        return any(self.changes.get(k) for k in ("new", "changed", "removed"))


class ProbeCache:
    """(frame count, fps, height, width) of each video by content hash, kept in the store's cache folder."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, list] = {}
        if path is not None and path.exists():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}
        self._dirty = False

    def info(self, digest: str, file: Path) -> tuple[int, float, int, int]:
        if digest not in self.entries:
            self.entries[digest] = list(read_video_info(file))
            self._dirty = True
        frames, fps, height, width = self.entries[digest]
        return int(frames), float(fps), int(height), int(width)

    def save(self) -> None:
        if self.path is not None and self._dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.entries))


def text_fingerprint(fingerprints: dict[str, str]) -> str:
    """One fingerprint for T5 + tokenizer from the component fingerprints: what text item keys depend on."""
    return hash_json([fingerprints["text_encoder"], fingerprints["tokenizer"]])


def plan_against_store(dataset: Path, store: Path, fingerprints: dict[str, str] | None = None,
                       hashes: FileHashes | None = None) -> Plan:
    """Plan an encode of `dataset` with the settings and dataset options recorded in `store`.

    `fingerprints` are the model's component fingerprints (vae, text_encoder, tokenizer); by default those the
    store recorded, which asks only whether the *dataset* changed (what cogtrain checks, with no T5 to hash).
    """
    manifest = S.Manifest.load(store)
    fingerprints = fingerprints or manifest.model["fingerprints"]
    info = manifest.dataset
    data = read_dataset(dataset, info.get("layout"), caption_column=info.get("caption_column"),
                        video_column=info.get("video_column"), id_token=info.get("id_token"))
    recorded = dict(manifest.settings)
    settings = EncodeSettings(**{**recorded, "sampling": FrameSampling(**recorded["sampling"])})
    hashes = hashes or FileHashes(Path(store) / CACHE_DIR / "files.json")
    task = get_variant(manifest.model["variant"]).task
    return plan_encode(data, BucketSpec.from_json(recorded["buckets"]), settings, fingerprints["vae"],
                       text_fingerprint(fingerprints), Path(store), hashes, task)


def text_key(caption: str, text_fingerprint: str, settings: EncodeSettings) -> str:
    return hash_json(["text", caption, text_fingerprint, settings.text_length, settings.dtype])


def plan_encode(
    dataset: Dataset,
    spec: BucketSpec,
    settings: EncodeSettings,
    vae_fingerprint: str,
    text_fingerprint: str,
    store: Path,
    hashes: FileHashes,
    task: str,
    save_caches: bool = True,
) -> Plan:
    """Compare the dataset as it is now with the store and list the work. Reads no video that it knows.

    `task` is the model's (``t2v`` or ``i2v``): an image-to-video model skips image entries. With `save_caches`
    False nothing is written (the caller calls `Plan.save_caches` when it may write)."""
    probes = ProbeCache(Path(store) / CACHE_DIR / "probe.json")
    bad = list(dataset.bad)
    samples: list[dict[str, Any]] = []
    jobs: dict[str, VideoJob] = {}
    item_settings = [settings.resize, asdict(settings.sampling), vae_fingerprint, settings.dtype,
                     settings.image_noise_variants, settings.seed]
    for item in dataset.items:
        if item.kind == "image" and task == "i2v":
            # An I2V sample is conditioned on its first frame: a 1-frame sample would be conditioned on itself
            # and teach the model to copy its condition.
            bad.append(BadItem(item.source, f"{item.path}: {IMAGE_FOR_I2V}: a still image would be conditioned on "
                                            f"itself (image-to-video trains on videos only)"))
            continue
        try:
            planned = _plan_item(item, spec, settings, item_settings, text_fingerprint, hashes, probes)
        except INPUT_ERRORS as e:  # one bad file never stops the run: it is reported and skipped
            bad.append(BadItem(item.source, _one_line(e, item.path)))
            continue
        if isinstance(planned, str):
            bad.append(BadItem(item.source, planned))
            continue
        for row, job in planned:
            samples.append(row)
            jobs[job.key] = job
    _dedupe_keys(samples)
    if save_caches:
        hashes.save()
        probes.save()

    if (Path(store) / S.INDEX).exists():
        S.Manifest.load(store)  # refuses a store of another format version: its items are not reusable
    old_rows = S.read_index(store)
    video_locations, text_locations = _known_items(store, old_rows)
    damaged = S.read_damaged(store)  # found by cogprep verify: cached, but not reusable
    for key in damaged:
        video_locations.pop(key, None)
        text_locations.pop(key, None)
    plan = Plan(
        samples=samples,
        video_jobs={k: j for k, j in jobs.items() if k not in video_locations},
        text_jobs={r["text_key"]: r["caption"] for r in samples if r["text_key"] not in text_locations},
        video_locations=video_locations,
        text_locations=text_locations,
        bad=bad,
        caches=[hashes, probes],
    )
    plan.changes = _changes(old_rows, samples, set(damaged))
    return plan


def _plan_item(item: DatasetItem, spec, settings, item_settings, text_fingerprint, hashes, probes):
    digest = hashes.hash(item.path)
    if item.image is not None:
        digest = hash_json([digest, hashes.hash(item.image)])
    frames, fps, height, width = probes.info(digest, item.path)  # an image probes as 1 frame
    available = 1 if item.kind == "image" else usable_frames(frames, fps, settings.sampling)
    bucket = assign_bucket(height, width, max(available, 1), spec)
    if bucket is None or (item.kind == "video" and available < 2):
        smallest = min(b.frames for b in spec.buckets)
        return f"{item.path}: {available} usable frames, fewer than the smallest frame bucket ({smallest})"
    if item.kind == "image":
        windows = [ClipWindow(0, 1.0, 1)]
    else:
        allowed = list(spec.frames_by_resolution[bucket.resolution])
        clip_plan = plan_clips(frames, fps, settings.sampling, allowed)
        if not clip_plan.windows:
            return f"{item.path}: {clip_plan.reason}"
        windows = clip_plan.windows
    stat = item.path.stat()
    tkey = text_key(item.caption, text_fingerprint, settings)
    out = []
    for w in windows:
        b = Bucket(w.frames, bucket.height, bucket.width)
        vkey = hash_json(["video", digest, w.start, w.stride, w.frames, b.name, *item_settings])
        row = {
            "key": hash_json([item.source, w.start, w.stride, b.name, vkey, tkey]),
            "source": item.source,
            "kind": item.kind,
            "bucket": b.name,
            "frames": b.frames,
            "height": b.height,
            "width": b.width,
            "caption": item.caption,
            "clip_start": w.start,
            "clip_step": float(w.stride),
            "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns,
            "source_hash": digest,
            "video_key": vkey,
            "text_key": tkey,
        }
        out.append((row, VideoJob(vkey, item.path, item.kind, item.image, w, b)))
    return out


def _dedupe_keys(samples: list[dict[str, Any]]) -> None:
    """The same clip listed twice with the same caption is one sample in the index, not two."""
    seen: set[str] = set()
    kept = []
    for row in samples:
        if row["key"] not in seen:
            seen.add(row["key"])
            kept.append(row)
    samples[:] = kept


def _known_items(store: Path, old_rows: list[dict[str, Any]]):
    """Items the index points at, plus items in closed shards the index does not know (a killed run's work)."""
    video: dict[str, dict[str, S.Location]] = {}
    text: dict[str, tuple[S.Location, int]] = {}
    for r in old_rows:
        members, text_location = S.row_locations(r)
        video[r["video_key"]] = members
        text[r["text_key"]] = (text_location, r["text_tokens"])
    referenced = {r["shard"] for r in old_rows} | {r["text_shard"] for r in old_rows}
    reader = S.ShardReader(store)
    for shard in S.list_shards(store):
        if shard in referenced:
            continue
        try:
            items = S.scan_shard(store, shard)
        except Exception:
            continue  # an unreadable orphan is garbage for `cogprep gc`, never a reason to fail
        for key, members in items.items():
            if S.LATENT in members:
                video.setdefault(key, {m: loc for m, loc in members.items() if m != S.META})
            elif S.TEXT in members and S.META in members:
                meta = json.loads(reader.read(members[S.META].shard, members[S.META].offset, members[S.META].size))
                text.setdefault(key, (members[S.TEXT], int(meta["tokens"])))
    reader.close()
    return video, text


def _changes(old_rows: list[dict[str, Any]], samples: list[dict[str, Any]],
             damaged: set[str]) -> dict[str, list[str]]:
    """Sources by what an encode does to them; a source with `damaged` cached items counts as changed."""
    def by_source(rows):
        out: dict[str, set] = {}
        for r in rows:
            out.setdefault(r["source"], set()).add((r["video_key"], r["text_key"]))
        return out

    old, new = by_source(old_rows), by_source(samples)
    hurt = {r["source"] for r in old_rows if r["video_key"] in damaged or r["text_key"] in damaged}
    kept = {s for s in new if s in old and new[s] == old[s] and s not in hurt}
    return {
        "new": sorted(s for s in new if s not in old),
        "changed": sorted(s for s in new if s in old and s not in kept),
        "removed": sorted(s for s in old if s not in new),
        "unchanged": sorted(kept),
    }


def _one_line(e: Exception, path: Path) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if str(path) in text else f"{path}: {text}"
