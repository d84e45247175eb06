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

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..shared import store as S
from ..shared.atomic import atomic_write_text
from ..shared.buckets import Bucket, BucketSpec, assign_bucket
from ..shared.errors import CogtuneError
from ..shared.fingerprint import FileHashes, dataset_file_hashes, hash_fragments, hash_json, json_fragment
from ..shared.store import CACHE_DIR
from ..shared.variants import get_variant
from ..shared.video import read_video_info
from .datasets import BadItem, Dataset, DatasetItem, read_dataset
from .frames import ClipWindow, FrameSampling, ResizeMode, plan_clips, usable_frames

INPUT_ERRORS = (CogtuneError, OSError)
"""What a damaged, missing or unreadable input file raises (shared/video.py turns every decoder error into a
`CogtuneError`): such an item is skipped and reported. Any other exception is a bug in cogtune and propagates."""
IMAGE_FOR_I2V = "image for image-to-video"
"""Why an image-to-video model skips image entries (the summary counts skipped items by this phrase)."""
SKIP_KINDS = (
    # (a phrase of the reasons cogtune words, the kind of bad item it means), most specific first: a reason
    # starts with a path or a dataset line, which may hold any word, so every phrase is one cogtune writes
    (IMAGE_FOR_I2V, IMAGE_FOR_I2V),
    ("unsupported video codec", "unsupported video codec"),
    ("no video stream", "no video stream"),
    ("not a readable video", "corrupt or truncated video"),
    ("cannot decode", "undecodable frames"),
    ("not a readable image", "corrupt image"),
    ("empty file (0 bytes)", "empty file"),
    ("usable frames", "too few frames"),
    ("video has no frames", "too few frames"),
    ("frames, asked for frame", "too few frames"),
    ("[Errno ", "unreadable file"),
    ("caption is not valid UTF-8", "bad caption"),
    ("empty caption", "bad caption"),
    ("not found", "missing file"),
    ("is not a file", "not a file"),
    (": not a file", "not a file"),
)
"""How the cogprep summary and report.json name each kind of skipped item."""


StorageDtype = Literal["bfloat16", "float16", "float32"]
"""The dtypes a store keeps latents and embeddings in."""


def skip_kind(reason: str) -> str:
    """The kind of bad item a skip `reason` describes, in words ("corrupt or truncated video"); "dataset entry"
    for the rest (a malformed JSON or CSV entry, an empty or undecodable path)."""
    for phrase, kind in SKIP_KINDS:
        if phrase in reason:
            return kind
    return "dataset entry"


@dataclass(frozen=True)
class EncodeSettings:
    """Everything that changes what cogprep caches; stored in store.json and part of every content key."""

    buckets: dict[str, Any]
    """The bucket spec as given (file contents or --resolution), normalised to JSON."""
    sampling: FrameSampling
    """How clips are cut from each video."""
    resize: ResizeMode = "crop"
    """crop: cover then centre crop (keeps aspect); stretch: plain resize."""
    dtype: StorageDtype = "bfloat16"
    """Storage dtype of latents and embeddings."""
    image_noise_variants: int = field(default=4, metadata={"option": {"min": 0}})
    """I2V: noise-augmented encodings of the conditioning image cached per clip (none for text-to-video
    models)."""
    seed: int = field(default=0, metadata={"option": {"min": 0}})
    """Seed of the I2V noise augmentation (drawn per item, from its key)."""
    text_length: int = 226
    """Tokens every caption is padded or cut to: the transformer's max_text_seq_length."""

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


class KnownItems:
    """The items the store holds: those the index points at (kept as columns), plus those in closed shards the
    index does not know (a killed run's work), less those `cogprep verify` found damaged.

    Planning needs only the keys (sets); the locations, what an encode's commit needs, are made into dicts on
    first use, so `cogprep status` and cogtrain's start-up check never build a million of them."""

    LOCATION_COLUMNS = ("video_key", "text_key", "text_tokens", *S.SAMPLE_COLUMNS)
    """Read with the plan; the members' CRCs (`S.CRC_COLUMNS`) only with the locations, from `store`."""

    def __init__(self, index: dict[str, list] | None, video_orphans: dict[str, dict[str, S.Location]],
                 text_orphans: dict[str, tuple[S.Location, int]], damaged: set[str], store: Path | None = None):
        self._index = index or {name: [] for name in self.LOCATION_COLUMNS}
        self._store = store
        self._video_orphans, self._text_orphans, self._damaged = video_orphans, text_orphans, damaged
        self.video_keys = (set(self._index["video_key"]) | set(video_orphans)) - damaged
        self.text_keys = (set(self._index["text_key"]) | set(text_orphans)) - damaged

    @functools.cached_property
    def video(self) -> dict[str, dict[str, S.Location]]:
        out = {}
        for row in self._rows():
            out[row["video_key"]] = S.row_locations(row)[0]
        for key, members in self._video_orphans.items():
            out.setdefault(key, members)
        for key in self._damaged:
            out.pop(key, None)
        return out

    @functools.cached_property
    def text(self) -> dict[str, tuple[S.Location, int]]:
        out = {}
        for row in self._rows():
            out[row["text_key"]] = (S.row_locations(row)[1], row["text_tokens"])
        for key, item in self._text_orphans.items():
            out.setdefault(key, item)
        for key in self._damaged:
            out.pop(key, None)
        return out

    @functools.cached_property
    def _crcs(self) -> dict[str, list]:
        """The index's CRC columns, row for row with the planned columns (an encode holds the store lock from
        its plan to its commit)."""
        if self._store is None or not self._index["video_key"]:
            return {}
        return S.read_index_columns(self._store, S.CRC_COLUMNS)

    def _rows(self):
        columns = self._index | self._crcs
        names = list(columns)
        for values in zip(*columns.values()):
            yield dict(zip(names, values))


@dataclass
class Plan:
    samples: list[dict[str, Any]]
    """Every sample of the dataset as an index row without member locations, in dataset order."""
    video_jobs: dict[str, VideoJob]
    """Video items no shard holds yet, by key."""
    text_jobs: dict[str, str]
    """Text items no shard holds yet: key -> caption."""
    known: KnownItems
    """The items the store holds (see `video_locations`, `text_locations`)."""
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
    def video_locations(self) -> dict[str, dict[str, S.Location]]:
        """Known video items: key -> {member: Location} (made on first use)."""
        return self.known.video

    @property
    def text_locations(self) -> dict[str, tuple[S.Location, int]]:
        """Known text items: key -> (Location, token count) (made on first use)."""
        return self.known.text

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
                       hashes: FileHashes | None = None, data: Dataset | None = None,
                       within: set[str] | None = None) -> Plan:
    """Plan an encode of `dataset` with the settings and dataset options recorded in `store`.

    `fingerprints` are the model's component fingerprints (vae, text_encoder, tokenizer); by default those the
    store recorded, which asks only whether the *dataset* changed (what cogtrain checks, with no T5 to hash).
    `data`: the entries of `dataset` to plan where the caller has read them, and `within`, where those are the
    entries of some sources only, those sources (see `plan_encode`).
    """
    manifest = S.Manifest.load(store)
    fingerprints = fingerprints or manifest.model["fingerprints"]
    info = manifest.dataset
    if data is None:
        data = read_dataset(dataset, info.get("layout"), caption_column=info.get("caption_column"),
                            video_column=info.get("video_column"), id_token=info.get("id_token"))
    recorded = dict(manifest.settings)
    settings = EncodeSettings(**{**recorded, "sampling": FrameSampling(**recorded["sampling"])})
    hashes = hashes or dataset_file_hashes(Path(store) / CACHE_DIR)
    task = get_variant(manifest.model["variant"]).task
    return plan_encode(data, BucketSpec.from_json(recorded["buckets"]), settings, fingerprints["vae"],
                       text_fingerprint(fingerprints), Path(store), hashes, task, within=within)


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
    progress: bool = False,
    journal_hashes: bool = False,
    within: set[str] | None = None,
) -> Plan:
    """Compare the dataset as it is now with the store and list the work. Reads no video that it knows.

    `task` is the model's (``t2v`` or ``i2v``): an image-to-video model skips image entries. With `save_caches`
    False nothing is written (the caller calls `Plan.save_caches` when it may write), except, with
    `journal_hashes`, the hash journal (see `FileHashes.hash_files`), so a run killed while hashing the files
    of a first encode hashes none of them again. `progress`: a progress bar over that hashing. `within`: the
    sources `dataset` is limited to (every entry of each), where the caller knows the rest are unchanged:
    `Plan.changes` then counts among those sources alone, and its samples are not the whole index's."""
    probes = ProbeCache(Path(store) / CACHE_DIR / "probe.json")
    bad = list(dataset.bad)
    samples: list[dict[str, Any]] = []
    jobs: dict[str, VideoJob] = {}
    keys = _Keys(settings, vae_fingerprint, text_fingerprint)
    if (Path(store) / S.INDEX).exists():
        S.Manifest.load(store)  # refuses a store of another format version: its items are not reusable
    # the index as columns (lists), never as a million row dicts
    index = S.read_index_columns(store, ("key", "source", *KnownItems.LOCATION_COLUMNS))
    damaged = set(S.read_damaged(store))  # found by cogprep verify: cached, but not reusable
    known = _known_items(store, index, damaged)
    # the files the cache cannot vouch for (all of them, the first time) are hashed first, on threads
    hashes.hash_files(((str(item.path), item.stat) for item in dataset.items
                       if item.stat is not None and not (item.kind == "image" and task == "i2v")),
                      progress=progress, journal=journal_hashes)
    for item in dataset.items:
        if item.kind == "image" and task == "i2v":
            bad.append(image_for_i2v(item))
            continue
        try:
            planned = _plan_item(item, spec, settings, keys, hashes, probes, known.video_keys)
        except INPUT_ERRORS as e:  # one bad file never stops the run: it is reported and skipped
            bad.append(BadItem(item.source, _one_line(e, item.path)))
            continue
        if isinstance(planned, str):
            bad.append(BadItem(item.source, planned))
            continue
        for row, job in planned:
            samples.append(row)
            if job is not None:
                jobs[job.key] = job
    _dedupe_keys(samples)
    if save_caches:
        hashes.save()
        probes.save()

    plan = Plan(
        samples=samples,
        video_jobs=jobs,
        text_jobs={r["text_key"]: r["caption"] for r in samples if r["text_key"] not in known.text_keys},
        known=known,
        bad=bad,
        caches=[hashes, probes],
    )
    plan.changes = _changes(index, samples, damaged, within)
    return plan


def image_for_i2v(item: DatasetItem) -> BadItem:
    """Why an image-to-video model skips the image entry `item`: an I2V sample is conditioned on its first frame,
    so a 1-frame sample would be conditioned on itself and teach the model to copy its condition."""
    return BadItem(item.source, f"{item.path}: {IMAGE_FOR_I2V}: a still image would be conditioned on itself "
                                f"(image-to-video trains on videos only)")


class _Keys:
    """The content keys of `plan_encode`, exactly `hash_json` of the lists below, with the parts every item
    shares encoded once (`json_fragment`): the same keys as ever, a store encoded before is current after."""

    def __init__(self, settings: EncodeSettings, vae_fingerprint: str, text_fingerprint: str):
        item_settings = [settings.resize, asdict(settings.sampling), vae_fingerprint, settings.dtype,
                         settings.image_noise_variants, settings.seed]
        self._video_tail = ",".join(map(json_fragment, item_settings))
        self._text_tail = ",".join(map(json_fragment, [text_fingerprint, settings.text_length, settings.dtype]))
        self.windows: dict = {}
        """(kind, probe) -> windows (see `_windows`), for this plan's spec and sampling."""

    def text(self, caption: str) -> str:
        """``hash_json(["text", caption, text fingerprint, text length, dtype])`` (`text_key`)."""
        return hash_fragments(f'"text",{json_fragment(caption)},{self._text_tail}')

    @staticmethod
    @functools.lru_cache(maxsize=4096)
    def window(start: int, stride: float, frames: int, bucket: str) -> tuple[str, str]:
        """The fragments of a clip window: (start, stride, frames, bucket) and (start, stride, bucket)."""
        start, stride, bucket = json_fragment(start), json_fragment(stride), json_fragment(bucket)
        return f"{start},{stride},{json_fragment(frames)},{bucket}", f"{start},{stride},{bucket}"

    def video(self, digest: str, window: str) -> str:
        """``hash_json(["video", digest, start, stride, frames, bucket, *item settings])``."""
        return hash_fragments(f'"video",{json_fragment(digest)},{window},{self._video_tail}')

    @staticmethod
    def sample(source: str, window: str, vkey: str, tkey: str) -> str:
        """``hash_json([source, start, stride, bucket, video key, text key])``."""
        return hash_fragments(f'{json_fragment(source)},{window},"{vkey}","{tkey}"')


def _plan_item(item: DatasetItem, spec, settings, keys: _Keys, hashes, probes, known_videos: set[str]):
    """(index row, VideoJob or None where `known_videos` holds its item) for each clip of `item`; or why none."""
    # one stat per file: the dataset reader's (its real path and stat), else the hash cache's own
    known = (str(item.path), item.stat) if item.stat is not None else None
    digest, stat = hashes.hash_and_stat(item.path, known)
    if item.image is not None:
        digest = hash_json([digest, hashes.hash(item.image)])
    windows = _windows(item.kind, probes.info(digest, item.path), spec, settings.sampling, keys.windows)
    if isinstance(windows, str):
        return f"{item.path}: {windows}"
    tkey = keys.text(item.caption)
    out = []
    for w, b, bucket_name, (window_fragment, sample_fragment) in windows:
        vkey = keys.video(digest, window_fragment)
        row = {
            "key": keys.sample(item.source, sample_fragment, vkey, tkey),
            "source": item.source,
            "kind": item.kind,
            "bucket": bucket_name,
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
        out.append((row, None if vkey in known_videos else VideoJob(vkey, item.path, item.kind, item.image, w, b)))
    return out


def _windows(kind: str, probe: tuple[int, float, int, int], spec: BucketSpec, sampling: FrameSampling,
             cache: dict):
    """[(ClipWindow, Bucket, its key fragments)] of a source of `kind` and `probe`, or why it has none.
    Remembered in `cache` (one per plan) by (kind, probe): sources of one shape and length share them."""
    hit = cache.get((kind, probe))
    if hit is None:
        hit = cache[(kind, probe)] = _windows_of(kind, probe, spec, sampling)
    return hit


def _windows_of(kind: str, probe: tuple[int, float, int, int], spec: BucketSpec, sampling: FrameSampling):
    frames, fps, height, width = probe
    available = 1 if kind == "image" else usable_frames(frames, fps, sampling)
    bucket = assign_bucket(height, width, max(available, 1), spec)
    if bucket is None or (kind == "video" and available < 2):
        smallest = min(b.frames for b in spec.buckets)
        return f"{available} usable frames, fewer than the smallest frame bucket ({smallest})"
    if kind == "image":
        windows = [ClipWindow(0, 1.0, 1)]
    else:
        allowed = list(spec.frames_by_resolution[bucket.resolution])
        clip_plan = plan_clips(frames, fps, sampling, allowed)
        if not clip_plan.windows:
            return clip_plan.reason
        windows = clip_plan.windows
    out = []
    for w in windows:
        b = Bucket(w.frames, bucket.height, bucket.width)
        out.append((w, b, b.name, _Keys.window(w.start, w.stride, w.frames, b.name)))
    return tuple(out)


def _dedupe_keys(samples: list[dict[str, Any]]) -> None:
    """The same clip listed twice with the same caption is one sample in the index, not two."""
    seen: set[str] = set()
    kept = []
    for row in samples:
        if row["key"] not in seen:
            seen.add(row["key"])
            kept.append(row)
    samples[:] = kept


def _known_items(store: Path, index: dict[str, list] | None, damaged: set[str]) -> KnownItems:
    """Items the index points at, plus items in closed shards the index does not know (a killed run's work)."""
    video: dict[str, dict[str, S.Location]] = {}
    text: dict[str, tuple[S.Location, int]] = {}
    referenced = set(index["shard"]) | set(index["text_shard"]) if index else set()
    reader = None
    for shard in S.list_shards(store):
        if shard in referenced:
            continue
        try:
            items = S.scan_shard(store, shard)
        except Exception:
            continue  # an unreadable orphan is garbage for `cogprep gc`, never a reason to fail
        reader = reader or S.ShardReader(store)
        for key, members in items.items():
            if S.LATENT in members:
                video.setdefault(key, {m: loc for m, loc in members.items() if m != S.META})
            elif S.TEXT in members and S.META in members:
                meta = json.loads(reader.read(members[S.META].shard, members[S.META].offset, members[S.META].size))
                text.setdefault(key, (members[S.TEXT], int(meta["tokens"])))
    if reader is not None:
        reader.close()
    return KnownItems({name: index[name] for name in KnownItems.LOCATION_COLUMNS} if index else None, video, text,
                      damaged, store)


def _changes(index: dict[str, list] | None, samples: list[dict[str, Any]],
             damaged: set[str], within: set[str] | None = None) -> dict[str, list[str]]:
    """Sources by what an encode does to them; a source with `damaged` cached items counts as changed; with
    `within`, only those sources of the index are compared.

    A source is unchanged when its (video key, text key) pairs are those the index holds for it. Compared as
    sets of (source, video key, text key): a source with a triple on one side only has changed."""
    old_source, old_video, old_text = (index["source"], index["video_key"], index["text_key"]) if index else ([], [], [])
    if within is not None:
        kept = [i for i, source in enumerate(old_source) if source in within]
        old_source, old_video, old_text = ([column[i] for i in kept] for column in (old_source, old_video, old_text))
    new = {r["source"] for r in samples}
    old = set(old_source)
    new_triples = {(r["source"], r["video_key"], r["text_key"]) for r in samples}
    old_triples = set(zip(old_source, old_video, old_text))
    differ = {t[0] for t in new_triples - old_triples} | {t[0] for t in old_triples - new_triples}
    del new_triples, old_triples
    if damaged:
        differ |= {s for s, v, t in zip(old_source, old_video, old_text) if v in damaged or t in damaged}
    both = new & old
    return {
        "new": sorted(new - old),
        "changed": sorted(both & differ),
        "removed": sorted(old - new),
        "unchanged": sorted(both - differ),
    }


def _one_line(e: Exception, path: Path) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if str(path) in text else f"{path}: {text}"
