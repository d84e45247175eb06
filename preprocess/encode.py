"""Running an encode: decode in CPU workers, encode with the VAE and T5, write shards, commit the index.

One process or many (``torchrun --nproc_per_node N $(which cogprep) encode ...``, or accelerate launch): every
rank plans the same work, takes every N-th item, writes its own shards and a list of what it wrote, and rank 0
writes the one index. The index is written last and atomically: a run killed at any moment leaves the previous
store intact, and the next run reuses the items in the shards it had closed.

This module runs the steps (plan, texts, videos, commit) and never imports torch itself: the T5 and VAE work and
the decode workers are in `compute`, imported once there is something to encode, so a no-op re-run never loads
torch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from ..shared import store as S
from ..shared.buckets import Bucket, BucketSpec
from ..shared.disk import free_bytes, human_bytes, is_write_failure, write_error
from ..shared.errors import CogtuneError
from ..shared.fingerprint import FileHashes, dataset_file_hashes, hash_json, model_file_hashes
from ..shared.models import Model, parse_dtype
from ..shared.provenance import software_versions
from .datasets import BadItem, Dataset
from .plan import (
    CACHE_DIR,
    EncodeSettings,
    KnownItems,
    Plan,
    VideoJob,
    image_for_i2v,
    plan_encode,
    skip_kind,
    text_fingerprint,
)
from .staleness import columns_of, current_by_columns, indexed_sources

log = logging.getLogger(__name__)
PENDING = ".pending"
KILL_HOOK = "COGTUNE_TEST_KILL_AT"
"""Test hook for the crash tests (tests/test_prep_robust.py), never set in real use: ``item:N`` kills this
process with SIGKILL right after its N-th item is written to a shard, ``index`` right after index.parquet is
written and before store.json."""
ComputeDtype = Literal["auto", "bfloat16", "float16", "float32"]
TEXT_COMPONENTS = ("text_encoder", "tokenizer")
PREP_COMPONENTS = ("vae", "text_encoder", "tokenizer")


@dataclass
class RunOptions:
    """How to run an encode; none of these change what is cached."""

    device: str = "auto"
    """auto (cuda:LOCAL_RANK if present, else cpu), cpu, cuda, cuda:1, ..."""
    compute_dtype: ComputeDtype = "auto"
    """Dtype the VAE and T5 run in: auto is bfloat16 on a GPU, float32 on the CPU."""
    workers: int = field(default=2, metadata={"option": {"min": 0}})
    """CPU processes decoding and resizing clips while the model encodes (0: decode in this process)."""
    text_batch_size: int = field(default=16, metadata={"option": {"min": 1}})
    """Captions per T5 call."""
    vae_tiling: bool = False
    """Encode in spatial tiles (less memory for large frames)."""
    vae_slicing: bool = False
    """Encode batch items one at a time."""
    strict: bool = False
    """Any bad item: exit 2 and write nothing."""
    rehash: bool = False
    """Re-hash every source file instead of trusting unchanged size and mtime."""
    shard_max_bytes: int = field(default=S.SHARD_MAX_BYTES, metadata={"option": {"min": 1}})
    """Bytes per shard before a new shard is started."""
    shard_max_items: int = field(default=S.SHARD_MAX_ITEMS, metadata={"option": {"min": 1}})
    """Items per shard before a new shard is started."""
    validation_prompts: Path | None = None
    """Text file, one prompt a line, embedded for cogtrain's validation."""
    validation_images: Path | None = None
    """I2V: text file of image paths, one per validation prompt."""
    progress: bool = True
    """Show progress bars."""


@dataclass
class EncodeResult:
    plan: Plan
    encoded_videos: int = 0
    encoded_texts: int = 0
    samples: int = 0
    skipped: list[BadItem] = field(default_factory=list)
    seconds: float = 0.0


def _test_kill(point: str) -> None:
    if os.environ.get(KILL_HOOK) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (torchrun, accelerate)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _barrier(world: int) -> None:
    if world > 1:
        from . import compute as ops

        ops.barrier()


def model_fingerprints(model: Model, hashes: FileHashes) -> tuple[str, str, dict[str, str]]:
    """(VAE fingerprint, text fingerprint (T5 + tokenizer), all component fingerprints)."""
    fps = model.fingerprint(PREP_COMPONENTS, hashes)
    return fps["vae"], text_fingerprint(fps), fps


def run_encode(
    dataset: Dataset,
    model: Model,
    store: Path,
    spec: BucketSpec,
    settings: EncodeSettings,
    options: RunOptions,
    dataset_info: dict[str, Any],
) -> EncodeResult:
    """Encode what `dataset` needs and the store lacks, then commit the index (see the module docstring)."""
    store = Path(store)
    _validation_inputs(options, model.variant.task)  # refused before any work, not after the encode
    if dist_info()[0] != 0:  # rank 0 holds the lock for the whole job
        return _run_encode(dataset, model, store, spec, settings, options, dataset_info, created=None)
    # The store is locked for the whole run, so `cogprep gc` cannot delete shards this run reuses or writes
    # before they are committed. The lock covers creating the store as well: two first encodes of one store
    # would both encode everything, and the second's start-up clean-up would delete the first's open shards.
    created = _first_missing(store)  # the topmost folder this run makes; None where the store exists
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CogtuneError(f"{store}: cannot create the store ({e.strerror})") from None
    was_empty = created is not None or not any(store.iterdir())
    with S.store_lock(store):  # refused in one line while another cogprep holds it: nothing touched then
        try:
            S.check_writable(store)
            return _run_encode(dataset, model, store, spec, settings, options, dataset_info, created)
        except BaseException:
            if was_empty:
                _remove_refused_first_encode(store, created)
            raise


def _remove_refused_first_encode(store: Path, created: Path | None) -> None:
    """A refused first encode leaves no empty store behind: the folders it made go, and in a folder the user made,
    the hash journal of its planning (no content without a commit). Anything else written there stays."""
    if any(p.is_file() and CACHE_DIR not in p.relative_to(store).parts for p in store.rglob("*")):
        return
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
    else:
        shutil.rmtree(store / CACHE_DIR, ignore_errors=True)


@dataclass
class _Run:
    """One encode's inputs, as every step takes them."""

    dataset: Dataset
    model: Model
    store: Path
    spec: BucketSpec
    settings: EncodeSettings
    options: RunOptions
    dataset_info: dict[str, Any]
    started: float = field(default_factory=time.time)


def _run_encode(dataset, model, store, spec, settings, options, dataset_info, created: Path | None) -> EncodeResult:
    """Plan, then encode this rank's share of the captions and the clips, then commit (rank 0, once every rank
    has written its list). `created`: the topmost folder this run made for the store (rank 0), None where the
    store existed."""
    run = _Run(dataset, model, store, spec, settings, options, dataset_info)
    rank, world, local_rank = dist_info()
    if rank == 0 and created is None:
        S.remove_temp_shards(store)
        shutil.rmtree(store / PENDING, ignore_errors=True)
    _barrier(world)
    no_op = _current_by_columns(run) if rank == 0 else None
    if _agreed(no_op is not None, world):
        return _no_op_step(run, no_op)
    plan, fps = _plan_step(run)
    result = EncodeResult(plan=plan)
    texts = sorted(plan.text_jobs)[rank::world]
    videos = [plan.video_jobs[k] for k in sorted(plan.video_jobs)[rank::world]]
    log.debug("to encode: %d clips and %d captions, split over %d process%s; bad items %d", len(plan.video_jobs),
              len(plan.text_jobs), world, "es" * (world > 1), len(plan.bad))
    extras_stale = rank == 0 and _extras_stale(store, text_fingerprint(fps), options)
    shards = _RankShards(store, options, rank, created)
    extras = None
    try:
        if texts or videos or extras_stale:
            from . import compute as ops

            device, compute = ops.compute_device(options.device, options.compute_dtype, local_rank)
            where = (device, compute, parse_dtype(settings.dtype))
            log.debug("encoding on %s in %s, storing %s", device, compute, settings.dtype)
            if texts or extras_stale:
                extras = _texts_step(run, shards, plan, texts, extras_stale, text_fingerprint(fps), where, result)
            if videos:
                _videos_step(run, shards, videos, where, result)
        shards.finish()
    except BaseException as e:
        shards.abort()
        if isinstance(e, Exception) and is_write_failure(e):
            raise write_error(getattr(e, "filename", None) or store, e, "the store",
                              "free space, then run cogprep encode again (the store keeps its last commit, and "
                              "the shards finished before the failure are reused)") from None
        raise
    shards.save_pending()
    _commit_step(run, plan, fps, shards, extras, result)
    result.seconds = time.time() - run.started
    return result


def _plan_step(run: _Run) -> tuple[Plan, dict[str, str]]:
    """The plan and the model's component fingerprints; refuses a --strict run with bad items, a dataset with no
    sample, and a disk without room for the work, before anything is written."""
    store, options = run.store, run.options
    hashes = dataset_file_hashes(store / CACHE_DIR, rehash=options.rehash)
    model_hashes = model_file_hashes(store / CACHE_DIR, rehash=options.rehash)
    vae_fp, text_fp, fps = model_fingerprints(run.model, model_hashes)
    plan = plan_encode(run.dataset, run.spec, run.settings, vae_fp, text_fp, store, hashes, run.model.variant.task,
                       save_caches=False, progress=options.progress and dist_info()[0] == 0,
                       journal_hashes=not options.strict)
    if options.strict and plan.bad:
        raise CogtuneError(f"{plan.bad[0].reason} (and {len(plan.bad) - 1} more bad items; --strict writes nothing)"
                           if len(plan.bad) > 1 else f"{plan.bad[0].reason} (--strict writes nothing)")
    if not plan.samples:
        raise _nothing_to_encode(run.dataset, plan.bad)
    needed, free = estimate_bytes(plan, run.model, run.settings), free_bytes(store)
    if needed > free:
        raise CogtuneError(f"{store}: this encode writes up to {human_bytes(needed)} ({len(plan.video_jobs)} clips, "
                           f"{len(plan.text_jobs)} captions), the disk has {human_bytes(free)} free: free space, or "
                           f"encode into a folder on another disk")
    store.mkdir(parents=True, exist_ok=True)
    if not options.strict:  # --strict writes nothing before it commits, not even the caches
        plan.save_caches()
        model_hashes.save()
    return plan, fps


# ---------------------------------------------------------------------------------------------------------
# the no-op by columns: a current store is answered as `cogprep status` answers it, no entry planned


@dataclass
class _NoOp:
    """What an encode with nothing to do reports, found by columns (`_current_by_columns`)."""

    skipped: list[BadItem]
    """The bad items, as the plan lists them."""
    samples: int
    """The index's rows."""
    manifest: S.Manifest | None
    """The manifest to commit the index with where the recorded one differs outside `_decisive` (the dataset or
    the model moved), as the plan path commits it; None where it is the recorded one (nothing is rewritten)."""


def _current_by_columns(run: _Run) -> _NoOp | None:
    """Rank 0: what this encode reports where it has nothing to do, or None where the plan must decide.

    Nothing to do is where the plan path would encode nothing and commit the rows the index holds
    (`_already_committed`): what the content keys and the reading of the dataset depend on is what the store
    recorded (`_decisive`), no damage is recorded, no killed run's list waits, the extras are current, and the
    columns find every listed entry in the index and no other (`current_by_columns`: with those settings and
    fingerprints, the keys are made of exactly those columns). Where the manifest differs otherwise (the dataset
    or the model moved), the plan path commits the same rows with the new manifest, and so does this one.
    --rehash trusts no size and mtime, so it plans."""
    store, options = run.store, run.options
    if options.rehash or (store / PENDING).exists() or (store / S.DAMAGED).exists() or not (store / S.INDEX).exists():
        return None
    model_hashes = model_file_hashes(store / CACHE_DIR)
    _, text_fp, fps = model_fingerprints(run.model, model_hashes)
    recorded = S.Manifest.load(store)
    counts = {bucket["name"]: bucket["samples"] for bucket in recorded.buckets}
    manifest = _manifest(run, fps, counts)
    if _decisive(recorded) != _decisive(manifest) or _extras_stale(store, text_fp, options):
        return None
    # the dataset as the CLI read it (the options the store recorded, compared above), not read a second time
    current = current_by_columns(Path(run.dataset_info["path"]), store, fps, columns_of(run.dataset))
    skipped = _reader_skips(run.dataset, run.model.variant.task)
    # The report lists the bad items one by one, the columns only count them: the list is the dataset reader's
    # (where every source is current, no bad item comes from the plan: a source the plan skipped is not in the
    # index, so the columns would differ), and its length must be the columns' count. --strict with bad items
    # is refused by the plan path, in its words.
    if current is None or not current.unchanged or current.bad != len(skipped) or (options.strict and skipped):
        return None
    if not options.strict:  # as the plan path keeps the model's file hashes
        model_hashes.save()
    moved = _compared(recorded) != _compared(manifest)
    return _NoOp(skipped, sum(counts.values()), manifest if moved else None)


MOVABLE = ("path", "file")
"""The dataset fields a moved dataset changes: the manifest records them, no content key or column holds them."""


def _decisive(manifest: S.Manifest) -> dict[str, Any]:
    """What the content keys and the columns' reading of the dataset depend on: the settings (bucket spec
    included), the model's variant (an image-to-video model skips images) and fingerprints, and the options the
    dataset is read with."""
    fields = _compared(manifest)
    return {"settings": fields["settings"], "variant": fields["model"]["variant"],
            "fingerprints": fields["model"]["fingerprints"],
            "dataset": {k: v for k, v in fields["dataset"].items() if k not in MOVABLE}}


def _reader_skips(dataset: Dataset, task: str) -> list[BadItem]:
    """The bad items the plan of a current store's `dataset` lists, in its order: the entries the reader refused,
    then the image entries an image-to-video model skips."""
    images = [image_for_i2v(item) for item in dataset.items if item.kind == "image"] if task == "i2v" else []
    return [*dataset.bad, *images]


def _agreed(flag: bool, world: int) -> bool:
    """Rank 0's `flag` on every rank (a broadcast), so that all take the same path."""
    if world == 1:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([int(flag)])
    dist.broadcast(value, src=0)  # the process group is up: `_barrier` started it
    return bool(value.item())


def _no_op_step(run: _Run, no_op: _NoOp | None) -> EncodeResult:
    """The result of an encode with nothing to do, as the plan path gives it: nothing encoded, the index and the
    manifest left as they are, rank 0's report written (the other ranks, `no_op` None, count nothing). Its plan
    lists no samples (the index holds them) and lists the unchanged sources from the index."""
    if no_op is None:
        return EncodeResult(plan=Plan([], {}, {}, KnownItems(None, {}, {}, set()), []))
    changes = {"new": [], "changed": [], "removed": [], "unchanged": indexed_sources(run.store)}
    plan = Plan([], {}, {}, KnownItems(None, {}, {}, set()), list(no_op.skipped), changes)
    world = dist_info()[1]
    log.debug("to encode: 0 clips and 0 captions, split over %d process%s; bad items %d (current by columns)",
              world, "es" * (world > 1), len(no_op.skipped))
    if no_op.manifest is not None:
        _recommit(run.store, no_op.manifest)
    result = EncodeResult(plan=plan, samples=no_op.samples, skipped=list(no_op.skipped))
    result.seconds = time.time() - run.started
    _write_report(run.store, result)
    return result


def _recommit(store: Path, manifest: S.Manifest) -> None:
    """Commit the index's rows as they are with `manifest`, as `_commit` does (no damage is recorded here)."""
    S.write_index(store, S.read_index_table(store, S.INDEX_SCHEMA.names), manifest)
    _test_kill("index")
    S.atomic_write_text(store / S.STORE_JSON, manifest.to_json())


def _texts_step(run: _Run, shards: _RankShards, plan: Plan, keys: list[str], extras_stale: bool, text_fp: str,
                where: tuple, result: EncodeResult) -> tuple[dict, dict] | None:
    """Encode the captions `keys` with T5; with `extras_stale`, also the empty and validation prompts, returned
    as extras.safetensors' (tensors, metadata) for the commit to write."""
    from . import compute as ops

    model, settings, options = run.model, run.settings, run.options
    device, compute, storage = where
    tokenizer, text_encoder = model.load_tokenizer(), model.load_text_encoder(compute, device)
    for start in tqdm(range(0, len(keys), options.text_batch_size), desc="texts", unit="batch",
                      disable=not options.progress or not keys):
        batch = keys[start : start + options.text_batch_size]
        embeds, tokens = ops.encode_prompts(tokenizer, text_encoder, [plan.text_jobs[k] for k in batch],
                                            settings.text_length, device)
        for key, emb, n in zip(batch, embeds, tokens):
            shards.put(S.TEXT_BUCKET, key, ("text", key, n), {
                S.TEXT: {S.EMBEDDING: emb.to(storage)},
                S.META: json.dumps({"caption": plan.text_jobs[key], "tokens": n}).encode(),
            })
        result.encoded_texts += len(batch)
    if not extras_stale:
        return None
    prompts, images = _validation_inputs(options)
    tensors = ops.extras_tensors(tokenizer, text_encoder, settings.text_length, prompts, images, device, storage)
    return tensors, {"inputs": _extras_inputs(text_fp, prompts, images), "validation_prompts": json.dumps(prompts)}


def _videos_step(run: _Run, shards: _RankShards, jobs: list[VideoJob], where: tuple, result: EncodeResult) -> None:
    """Decode `jobs` in the CPU workers and encode each clip with the VAE; a clip that fails to decode is
    recorded (--strict: refused)."""
    from . import compute as ops

    model, settings, options = run.model, run.settings, run.options
    device, compute, storage = where
    vae = model.load_vae(compute, device)
    if options.vae_tiling:
        vae.enable_tiling()
    if options.vae_slicing:
        vae.enable_slicing()
    i2v = model.variant.task == "i2v"
    for job, decoded in ops.decoded(jobs, settings.resize, i2v, options.workers, options.progress):
        if "error" in decoded:
            shards.failures[job.key] = decoded["error"]
            if options.strict:
                raise CogtuneError(f"{decoded['error']} (--strict writes nothing)")
            continue
        members = ops.encode_video_item(vae, decoded, job, settings, device, compute, storage)
        shards.put(job.bucket.name, job.key, ("video", job.key, 0), members)
        result.encoded_videos += 1


def _commit_step(run: _Run, plan: Plan, fps: dict[str, str], shards: _RankShards, extras: tuple | None,
                 result: EncodeResult) -> None:
    """Once every rank has written its list: refuse a run whose every clip failed (all ranks together), else
    rank 0 writes the extras, the index, the manifest and the report."""
    rank, world, _ = dist_info()
    store = run.store
    _barrier(world)
    lists = _pending_lists(store)
    failed = {key: reason for data in lists for key, reason in data["failures"].items()}
    if all(sample["video_key"] in failed for sample in plan.samples):
        # Every clip failed to decode: a commit would replace the store with an empty one. Every rank read the
        # same lists, so all refuse together; rank 0 removes the lists once all have read them.
        _barrier(world)
        shards.discard()
        if rank == 0:
            shutil.rmtree(store / PENDING, ignore_errors=True)
        skipped = {sample["source"]: failed[sample["video_key"]] for sample in plan.samples}
        raise _nothing_to_encode(run.dataset, [*plan.bad, *(BadItem(s, r) for s, r in skipped.items())])
    if rank == 0:
        if extras is not None:
            S.write_extras(store, *extras)
        if run.options.strict:
            plan.save_caches()
        _commit(run, plan, fps, lists, result)
        result.seconds = time.time() - run.started
        _write_report(store, result)
    _barrier(world)


class _RankShards:
    """What this rank writes: shards per bucket, filled by a packing thread, and the list of the items written
    and the clips that failed to decode, which rank 0's commit merges (`_pending_lists`)."""

    def __init__(self, store: Path, options: RunOptions, rank: int, created: Path | None):
        self.store, self.options, self.rank, self.created = store, options, rank, created
        self.prefix = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}-r{rank}"
        self.writers: dict[str, S.ShardWriter] = {}
        self.made: list[Path] = []  # shard folders this run created
        self.texts: dict[str, list] = {}
        self.videos: dict[str, dict[str, list]] = {}
        self.failures: dict[str, str] = {}
        self.written = 0
        self.packer = _Packer(self.writer)

    def writer(self, bucket: str) -> S.ShardWriter:
        if bucket not in self.writers:
            missing = _first_missing(self.store / S.SHARDS / bucket)
            if missing is not None:
                self.made.append(missing)
            self.writers[bucket] = S.ShardWriter(self.store, bucket, self.prefix, self.options.shard_max_bytes,
                                                 self.options.shard_max_items)
        return self.writers[bucket]

    def put(self, bucket: str, key: str, tag: tuple, members: dict[str, Any]) -> None:
        self._record(self.packer.put(bucket, key, tag, members))

    def finish(self) -> None:
        self._record(self.packer.finish())
        for w in self.writers.values():
            w.close()

    def abort(self) -> None:
        self.packer.cancel()  # the packing thread stops before the shards it writes to are dropped
        for w in self.writers.values():
            w.abort()
        if self.options.strict:  # nothing of this run may remain
            self.discard()

    def discard(self) -> None:
        """Delete every shard and folder this rank wrote (the writers are closed or aborted)."""
        for w in self.writers.values():
            for shard in w.closed_shards:
                (self.store / shard).unlink(missing_ok=True)
        for folder in self.made:
            shutil.rmtree(folder, ignore_errors=True)
        if self.created is not None and self.rank == 0:
            shutil.rmtree(self.created, ignore_errors=True)

    def save_pending(self) -> None:
        pending = self.store / PENDING / f"{self.prefix}.json"
        pending.parent.mkdir(parents=True, exist_ok=True)
        S.atomic_write_text(pending, json.dumps({"texts": self.texts, "videos": self.videos,
                                                 "failures": self.failures}))

    def _record(self, done: list[tuple[Any, dict[str, S.Location]]]) -> None:
        for (kind, key, tokens), locs in done:
            if kind == "text":
                self.texts[key] = [*_loc(locs[S.TEXT]), tokens]
            else:
                self.videos[key] = {m: _loc(loc) for m, loc in locs.items() if m != S.META}
            self.written += 1
            _test_kill(f"item:{self.written}")


TAR_OVERHEAD = 2048
"""Bytes a shard spends per member beyond its data, at most: a 512-byte header and padding to 512 bytes, with
room for the metadata member."""


def estimate_bytes(plan: Plan, model: Model, settings: EncodeSettings) -> int:
    """What encoding `plan` writes at most: its tensors uncompressed (gzip only takes away) plus tar overhead.

    A clip is its posterior mean and log-variance, C x ((F-1)/4+1) x H/8 x W/8 each (+ the I2V image, clean and
    K noisy, C x 1 x H/8 x W/8 each); a caption its text_length x D embedding."""
    size = parse_dtype(settings.dtype).itemsize
    vae = model.config("vae")
    total = 0
    for job in plan.video_jobs.values():
        frames, height, width = latent_grid(vae, (job.bucket.frames, job.bucket.height, job.bucket.width))
        frame = vae["latent_channels"] * height * width * size
        total += 2 * frames * frame + 2 * TAR_OVERHEAD
        if settings.image_noise_variants:
            total += (1 + settings.image_noise_variants) * frame + 4 * settings.image_noise_variants + TAR_OVERHEAD
    width = model.config("text_encoder")["d_model"]
    total += len(plan.text_jobs) * (settings.text_length * width * size + 2 * TAR_OVERHEAD)
    return total


def latent_grid(vae_config, pixels: tuple[int, int, int]) -> tuple[int, int, int]:
    """(latent frames, height, width) the VAE gives for F x H x W pixels: (F-1)/4+1 x H/8 x W/8 for CogVideoX."""
    temporal = vae_config["temporal_compression_ratio"]
    spatial = 2 ** (len(vae_config["block_out_channels"]) - 1)
    frames, height, width = pixels
    return (frames - 1) // temporal + 1, height // spatial, width // spatial


class _Packer:
    """Packs items (safetensors + gzip) and adds them to their shard on one background thread, in the order
    given, so the accelerator encodes the next clip while the CPU compresses this one (zlib releases the GIL).
    `put` returns the items finished so far as (tag, locations); at most `depth` wait, bounding memory."""

    def __init__(self, writer: Callable[[str], S.ShardWriter], depth: int = 2):
        self._writer = writer
        self._depth = depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cogprep-pack")
        self._waiting: deque[tuple[Any, Future]] = deque()

    def _pack_and_add(self, bucket: str, key: str, members: dict[str, Any]) -> dict[str, S.Location]:
        packed = {m: v if isinstance(v, bytes) else S.tensors_to_bytes(v) for m, v in members.items()}
        return self._writer(bucket).add(key, packed)

    def put(self, bucket: str, key: str, tag: Any, members: dict[str, Any]) -> list[tuple[Any, dict]]:
        self._waiting.append((tag, self._pool.submit(self._pack_and_add, bucket, key, members)))
        done = []
        while self._waiting and (len(self._waiting) > self._depth or self._waiting[0][1].done()):
            tag, future = self._waiting.popleft()
            done.append((tag, future.result()))
        return done

    def finish(self) -> list[tuple[Any, dict]]:
        done = [(tag, future.result()) for tag, future in self._waiting]
        self._waiting.clear()
        self._pool.shutdown()
        return done

    def cancel(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _first_missing(path: Path) -> Path | None:
    """The topmost folder of `path` (itself included) that does not exist yet; None where `path` exists."""
    missing = None
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing = folder
    return missing


def _loc(loc: S.Location) -> list:
    return [loc.shard, loc.offset, loc.size, loc.crc]


# ---------------------------------------------------------------------------------------------------------
# extras, commit, report


def _validation_inputs(options: RunOptions, task: str | None = None) -> tuple[list[str], list[Path]]:
    """The validation prompts and images; with the model's `task`, an image-to-video model's prompts without
    images are refused (cogtrain would fail at its first validation)."""
    prompts: list[str] = []
    images: list[Path] = []
    if options.validation_prompts is not None:
        path = Path(options.validation_prompts)
        try:
            prompts = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
        except OSError as e:
            raise CogtuneError(f"{path}: cannot read validation prompts ({e.strerror})") from None
    if options.validation_images is not None:
        path = Path(options.validation_images)
        try:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise CogtuneError(f"{path}: cannot read validation images ({getattr(e, 'strerror', None) or e})") from None
        images = [(path.parent / ln) for ln in lines]
        if len(images) != len(prompts):
            raise CogtuneError(f"{path}: {len(images)} validation images for {len(prompts)} validation prompts")
    elif prompts and task == "i2v":
        raise CogtuneError(f"{options.validation_prompts}: an image-to-video model needs a validation image per "
                           f"prompt: pass --validation-images FILE (one image path per line)")
    return prompts, images


def _extras_stale(store: Path, text_fp: str, options: RunOptions) -> bool:
    prompts, images = _validation_inputs(options)
    meta = S.read_extras_metadata(store)
    if meta is None:
        return True
    return meta.get("inputs") != _extras_inputs(text_fp, prompts, images)


def _extras_inputs(text_fp: str, prompts: list[str], images: list[Path]) -> str:
    """What the extras are made from, as recorded in their metadata: a change of any makes them stale."""
    return hash_json([text_fp, prompts, [str(p) for p in images]])


def _pending_lists(store: Path) -> list[dict[str, Any]]:
    """What every rank of this run wrote and failed to decode: {"texts", "videos", "failures"} per rank."""
    return [json.loads(pending.read_text()) for pending in sorted((store / PENDING).glob("*.json"))]


def _nothing_to_encode(dataset: Dataset, skipped: list[BadItem]) -> CogtuneError:
    """The refusal of an encode that would commit no sample: an empty dataset, or one whose every entry is bad."""
    if not skipped:
        return CogtuneError(f"{dataset.file}: the dataset lists no samples; nothing to encode")
    return CogtuneError(f"{dataset.file}: all {len(skipped)} entries of the dataset are bad, no sample to encode "
                        f"(first: {skipped[0].reason})")


def _commit(run: _Run, plan: Plan, fps: dict[str, str], lists: list[dict[str, Any]], result: EncodeResult) -> None:
    """Rank 0: merge every rank's new items (`lists`, see `_pending_lists`) with the known ones, write the index
    (the commit) and the manifest, unless the store already holds exactly these (a no-op encode writes neither)."""
    store = run.store
    rows, result.skipped = _merge_rows(plan, lists, result)
    manifest = _manifest(run, fps, Counter(r["bucket"] for r in rows))
    # compared only where the plan and the ranks found nothing to do: elsewhere the index surely changes
    nothing_new = not plan.stale and not (result.encoded_videos or result.encoded_texts)
    if not (nothing_new and _already_committed(store, rows, manifest)):
        S.write_index(store, rows, manifest)  # the commit point: rows and manifest together
        _test_kill("index")
        # the plan re-encoded what cogprep verify found damaged: the new index points at none of it
        S.write_damaged(store, {}, [])
        S.atomic_write_text(store / S.STORE_JSON, manifest.to_json())  # the readable copy
    shutil.rmtree(store / PENDING, ignore_errors=True)
    result.samples = len(rows)


def _merge_rows(plan: Plan, lists: list[dict[str, Any]], result: EncodeResult) -> tuple[list[dict], list[BadItem]]:
    """The index rows of every sample whose clip encoded (or was cached), and the skipped sources; counts every
    rank's work into `result`."""
    videos = dict(plan.video_locations)
    texts = dict(plan.text_locations)
    failures: dict[str, str] = {}
    result.encoded_videos = result.encoded_texts = 0  # every rank's work, from the lists they left
    for data in lists:
        result.encoded_videos += len(data["videos"])
        result.encoded_texts += len(data["texts"])
        for key, members in data["videos"].items():
            videos[key] = {m: S.Location(*loc) for m, loc in members.items()}
        for key, (*location, tokens) in data["texts"].items():
            texts[key] = (S.Location(*location), tokens)
        failures.update(data["failures"])
    rows = []
    skipped = list(plan.bad)
    failed_sources = set()
    for sample in plan.samples:
        vkey = sample["video_key"]
        if vkey in failures:
            if sample["source"] not in failed_sources:
                skipped.append(BadItem(sample["source"], failures[vkey]))
                failed_sources.add(sample["source"])
            continue
        text_loc, tokens = texts[sample["text_key"]]
        rows.append({**sample, **S.location_columns(videos[vkey], text_loc), "text_tokens": tokens})
    return rows, skipped


def _manifest(run: _Run, fps: dict[str, str], counts: dict[str, int]) -> S.Manifest:
    """The manifest of a commit by this run of `counts` samples per bucket name."""
    model = run.model
    buckets = []
    for name in sorted(counts):
        f, h, w = (int(x) for x in name.split("x"))
        buckets.append({"name": name, "frames": f, "height": h, "width": w,
                        "batch_size": run.spec.batch_size_for(Bucket(f, h, w)), "samples": counts[name]})
    return S.Manifest(
        model={"source": model.source, "path": str(model.path), "variant": model.variant.name, "fingerprints": fps,
               "configs": model.config_fingerprint(("vae", "text_encoder")),
               # what cogtrain checks the model's weights against: `fps` would make it read every byte
               "weights_identity": model.weights_identity(("vae", "text_encoder"))},
        settings=run.settings.to_json(),
        dataset=run.dataset_info,
        buckets=buckets,
        software=software_versions(),
    )


UNCOMPARED = ("updated", "software")
"""Manifest fields a commit of nothing new leaves as they were: its time, and the versions of the software that
encoded the items, which this run did not."""


def _already_committed(store: Path, rows: list[dict[str, Any]], manifest: S.Manifest) -> bool:
    """Whether the store's committed index and manifest are `rows` and `manifest` already (no item encoded, none
    removed, no setting or recorded path changed) and no damage is recorded: then nothing needs rewriting."""
    if not (store / S.INDEX).exists() or (store / S.DAMAGED).exists():
        return False
    return _compared(S.Manifest.load(store)) == _compared(manifest) and S.index_holds(store, rows)


def _compared(manifest: S.Manifest) -> dict[str, Any]:
    """The fields of `manifest` a commit of nothing new must find equal (all but `UNCOMPARED`)."""
    return {k: v for k, v in json.loads(manifest.to_json()).items() if k not in UNCOMPARED}


def _write_report(store: Path, result: EncodeResult) -> None:
    report = {
        "samples": result.samples,
        "encoded": {"videos": result.encoded_videos, "texts": result.encoded_texts},
        "changes": {k: len(v) for k, v in result.plan.changes.items()},
        "skipped": [{"source": b.source, "reason": b.reason, "kind": skip_kind(b.reason)} for b in result.skipped],
        "seconds": round(result.seconds, 3),
    }
    S.atomic_write_text(store / S.REPORT, json.dumps(report, indent=2))



