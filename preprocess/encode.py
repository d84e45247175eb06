"""Running an encode: decode in CPU workers, encode with the VAE and T5, write shards, commit the index.

One process or many (``torchrun --nproc_per_node N $(which cogprep) encode ...``, or accelerate launch): every
rank plans the same work, takes every N-th item, writes its own shards and a list of what it wrote, and rank 0
writes the one index. The index is written last and atomically: a run killed at any moment leaves the previous
store intact, and the next run reuses the items in the shards it had closed.
"""

from __future__ import annotations

import json
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
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from ..shared import store as S
from ..shared.buckets import Bucket, BucketSpec
from ..shared.disk import free_bytes, human_bytes, is_write_failure, write_error
from ..shared.errors import CogtuneError
from ..shared.fingerprint import FileHashes, hash_json
from ..shared.models import Model, parse_dtype
from ..shared.provenance import software_versions
from ..shared.video import read_frames
from .datasets import BadItem, Dataset
from .frames import resize_to_bucket
from .plan import (
    CACHE_DIR,
    INPUT_ERRORS,
    EncodeSettings,
    Plan,
    VideoJob,
    plan_encode,
    skip_kind,
    text_fingerprint,
)

if TYPE_CHECKING:  # torch is imported where there is work: a no-op re-run never loads it
    import torch

PENDING = ".pending"
KILL_HOOK = "COGTUNE_TEST_KILL_AT"
"""Test hook for the crash tests (tests/test_prep_robust.py), never set in real use: ``item:N`` kills this
process with SIGKILL right after its N-th item is written to a shard, ``index`` right after index.parquet is
written and before store.json."""
TEXT_COMPONENTS = ("text_encoder", "tokenizer")
PREP_COMPONENTS = ("vae", "text_encoder", "tokenizer")


@dataclass
class RunOptions:
    """How to run an encode; none of these change what is cached."""

    device: str = "auto"
    """``auto``: cuda:LOCAL_RANK when a GPU is present, else cpu."""
    compute_dtype: str = "auto"
    """Dtype the VAE and T5 run in: ``auto`` is bfloat16 on GPU, float32 on CPU."""
    workers: int = 2
    """CPU processes decoding and resizing clips while the accelerator encodes."""
    text_batch_size: int = 16
    vae_tiling: bool = False
    vae_slicing: bool = False
    strict: bool = False
    """Any bad item: exit 2 and write nothing."""
    rehash: bool = False
    """Re-hash every file instead of trusting unchanged (size, mtime)."""
    shard_max_bytes: int = 1 << 30
    shard_max_items: int = 1000
    validation_prompts: Path | None = None
    validation_images: Path | None = None
    progress: bool = True


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
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()


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
    with S.store_lock(store):  # refused in one line while another cogprep holds it: nothing touched then
        try:
            S.check_writable(store)
            return _run_encode(dataset, model, store, spec, settings, options, dataset_info, created)
        except BaseException:
            if created is not None and not any(p.is_file() for p in created.rglob("*")):
                shutil.rmtree(created, ignore_errors=True)  # a refused first encode leaves no empty store
            raise


def _run_encode(dataset, model, store, spec, settings, options, dataset_info, created: Path | None) -> EncodeResult:
    """`created`: the topmost folder this run made for the store (rank 0), None where the store existed."""
    started = time.time()
    rank, world, local_rank = dist_info()
    if rank == 0 and created is None:
        S.remove_temp_shards(store)
        shutil.rmtree(store / PENDING, ignore_errors=True)
    _barrier(world)

    hashes = FileHashes(store / CACHE_DIR / "files.json", rehash=options.rehash)
    vae_fp, text_fp, fps = model_fingerprints(model, hashes)
    plan = plan_encode(dataset, spec, settings, vae_fp, text_fp, store, hashes, model.variant.task,
                       save_caches=False)
    result = EncodeResult(plan=plan)
    if options.strict and plan.bad:
        raise CogtuneError(f"{plan.bad[0].reason} (and {len(plan.bad) - 1} more bad items; --strict writes nothing)"
                           if len(plan.bad) > 1 else f"{plan.bad[0].reason} (--strict writes nothing)")
    if not plan.samples:
        raise _nothing_to_encode(dataset, plan.bad)
    needed, free = estimate_bytes(plan, model, settings), free_bytes(store)
    if needed > free:
        raise CogtuneError(f"{store}: this encode writes up to {human_bytes(needed)} ({len(plan.video_jobs)} clips, "
                           f"{len(plan.text_jobs)} captions), the disk has {human_bytes(free)} free: free space, or "
                           f"encode into a folder on another disk")

    store.mkdir(parents=True, exist_ok=True)
    if not options.strict:  # --strict writes nothing before it commits, not even the caches
        plan.save_caches()
    prefix = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}-r{rank}"
    my_texts = sorted(plan.text_jobs)[rank::world]
    my_videos = [plan.video_jobs[k] for k in sorted(plan.video_jobs)[rank::world]]
    extras_stale = rank == 0 and _extras_stale(store, text_fp, options)
    if my_texts or my_videos or extras_stale:
        device, compute = _compute_device(options, local_rank)
        storage = parse_dtype(settings.dtype)

    writers: dict[str, S.ShardWriter] = {}
    made: list[Path] = []  # shard folders this run created

    def writer(bucket: str) -> S.ShardWriter:
        if bucket not in writers:
            missing = _first_missing(store / S.SHARDS / bucket)
            if missing is not None:
                made.append(missing)
            writers[bucket] = S.ShardWriter(store, bucket, prefix, options.shard_max_bytes, options.shard_max_items)
        return writers[bucket]

    new_texts: dict[str, list] = {}
    new_videos: dict[str, dict[str, list]] = {}
    failures: dict[str, str] = {}
    extras = None
    written = 0
    packer = _Packer(writer)

    def discard_run() -> None:
        """Delete every shard and folder this rank wrote (the writers are closed or aborted)."""
        for w in writers.values():
            for shard in w.closed_shards:
                (store / shard).unlink(missing_ok=True)
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)
        if created is not None and rank == 0:
            shutil.rmtree(created, ignore_errors=True)

    def record(done: list[tuple[Any, dict[str, S.Location]]]) -> None:
        nonlocal written
        for (kind, key, tokens), locs in done:
            if kind == "text":
                new_texts[key] = [*_loc(locs[S.TEXT]), tokens]
            else:
                new_videos[key] = {m: _loc(loc) for m, loc in locs.items() if m != S.META}
            written += 1
            _test_kill(f"item:{written}")

    try:
        if my_texts or extras_stale:
            tokenizer, text_encoder = model.load_tokenizer(), model.load_text_encoder(compute).to(device)
            for start in tqdm(range(0, len(my_texts), options.text_batch_size), desc="texts", unit="batch",
                              disable=not options.progress or not my_texts):
                keys = my_texts[start : start + options.text_batch_size]
                embeds, tokens = encode_prompts(tokenizer, text_encoder, [plan.text_jobs[k] for k in keys],
                                                settings.text_length, device)
                for key, emb, n in zip(keys, embeds, tokens):
                    record(packer.put(S.TEXT_BUCKET, key, ("text", key, n), {
                        S.TEXT: {S.EMBEDDING: emb.to(storage)},
                        S.META: json.dumps({"caption": plan.text_jobs[key], "tokens": n}).encode(),
                    }))
                result.encoded_texts += len(keys)
            if extras_stale:
                extras = _make_extras(tokenizer, text_encoder, settings, text_fp, options, device, storage)
            del text_encoder
        if my_videos:
            vae = model.load_vae(compute).to(device)
            if options.vae_tiling:
                vae.enable_tiling()
            if options.vae_slicing:
                vae.enable_slicing()
            i2v = model.variant.task == "i2v"
            for job, decoded in _decoded(my_videos, settings.resize, i2v, options):
                if "error" in decoded:
                    failures[job.key] = decoded["error"]
                    if options.strict:
                        raise CogtuneError(f"{decoded['error']} (--strict writes nothing)")
                    continue
                members = encode_video_item(vae, decoded, job, settings, device, compute, storage)
                record(packer.put(job.bucket.name, job.key, ("video", job.key, 0), members))
                result.encoded_videos += 1
        record(packer.finish())
        for w in writers.values():
            w.close()
    except BaseException as e:
        packer.cancel()  # the packing thread stops before the shards it writes to are dropped
        for w in writers.values():
            w.abort()
        if options.strict:  # nothing of this run may remain
            discard_run()
        if isinstance(e, Exception) and is_write_failure(e):
            raise write_error(getattr(e, "filename", None) or store, e, "the store",
                              "free space, then run cogprep encode again (the store keeps its last commit, and "
                              "the shards finished before the failure are reused)") from None
        raise

    pending = store / PENDING / f"{prefix}.json"
    pending.parent.mkdir(parents=True, exist_ok=True)
    S.atomic_write_text(pending, json.dumps({"texts": new_texts, "videos": new_videos, "failures": failures}))
    _barrier(world)
    lists = _pending_lists(store)
    failed = {key: reason for data in lists for key, reason in data["failures"].items()}
    if all(sample["video_key"] in failed for sample in plan.samples):
        # Every clip failed to decode: a commit would replace the store with an empty one. Every rank read the
        # same lists, so all refuse together; rank 0 removes the lists once all have read them.
        _barrier(world)
        discard_run()
        if rank == 0:
            shutil.rmtree(store / PENDING, ignore_errors=True)
        skipped = {sample["source"]: failed[sample["video_key"]] for sample in plan.samples}
        raise _nothing_to_encode(dataset, [*plan.bad, *(BadItem(s, r) for s, r in skipped.items())])
    if rank == 0:
        if extras is not None:
            S.write_extras(store, *extras)
        if options.strict:
            plan.save_caches()
        _commit(store, model, plan, settings, spec, fps, dataset_info, lists, result)
        result.seconds = time.time() - started
        _write_report(store, result)
    _barrier(world)
    result.seconds = time.time() - started
    return result


def encode_prompts(tokenizer, text_encoder, captions: list[str], max_length: int, device) -> tuple[list, list[int]]:
    """T5 embeddings exactly as the pipeline's ``_get_t5_prompt_embeds`` makes them (padded to `max_length`,
    no attention mask), and each caption's true token count."""
    inputs = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    import torch

    with torch.no_grad():
        embeds = text_encoder(inputs.input_ids.to(device))[0]
    return list(embeds.float().cpu()), [int(n) for n in inputs.attention_mask.sum(1)]


def encode_video_item(vae, decoded: dict, job: VideoJob, settings: EncodeSettings, device, compute, storage):
    """The members of one video item, tensors on the CPU (packed by `_Packer`): posterior mean and logvar of
    the clip, and the I2V image latents."""
    import torch

    frames = decoded["frames"]  # uint8 [F, H, W, 3]
    x = frames.permute(3, 0, 1, 2).unsqueeze(0).to(device, compute) / 127.5 - 1.0
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
    check_latent_shape(vae, tuple(frames.shape[:3]), tuple(posterior.mean.shape[2:]), job.path)
    members: dict[str, Any] = {
        S.LATENT: {S.MEAN: posterior.mean[0].to(storage).cpu(), S.LOGVAR: posterior.logvar[0].to(storage).cpu()},
        S.META: json.dumps({"source": str(job.path), "bucket": job.bucket.name, "clip_start": job.window.start,
                            "clip_step": job.window.stride}).encode(),
    }
    if settings.image_noise_variants > 0:
        members[S.IMAGE] = encode_image_variants(vae, decoded["image"], job.key, settings, device, compute, storage)
        image = decoded["image"]  # uint8 [H, W, 3]
        check_latent_shape(vae, (1, *image.shape[:2]), tuple(members[S.IMAGE][S.CLEAN].shape[1:]), job.path)
    return members


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


def check_latent_shape(vae, pixels: tuple[int, int, int], latents: tuple[int, ...], source: Path) -> None:
    """The VAE must give (F-1)/4+1 latent frames of H/8 x W/8 for F x H x W pixels, as the pipelines assume.
    Its tiled encode can miss by a row or column (seen with small tile sizes): refuse before caching that."""
    expected = latent_grid(vae.config, pixels)
    if latents != expected:
        hint = ": encode without --vae-tiling" if getattr(vae, "use_tiling", False) else ""
        raise CogtuneError(f"{source}: the VAE gave latents of {'x'.join(map(str, latents))} for "
                           f"{'x'.join(map(str, pixels))} pixels, expected {'x'.join(map(str, expected))}{hint}")


def encode_image_variants(vae, image: torch.Tensor, key: str, settings: EncodeSettings, device, compute, storage):
    """The I2V conditioning image, VAE-encoded as a 1-frame video: the clean posterior mean, and K encodings of
    the image with pixel-space noise sigma = exp(N(-3, 0.5)) (the augmentation the trainer draws from)."""
    import torch

    k = settings.image_noise_variants
    gen = torch.Generator().manual_seed((int(key[:15], 16) + settings.seed) % (2**63))
    pixels = image.permute(2, 0, 1).float() / 127.5 - 1.0  # [3, H, W]
    sigma = torch.exp(torch.randn(k, generator=gen) * 0.5 - 3.0)
    noisy = pixels[None] + sigma[:, None, None, None] * torch.randn((k, *pixels.shape), generator=gen)
    batch = torch.cat([pixels[None], noisy]).unsqueeze(2).to(device, compute)  # [K+1, 3, 1, H, W]
    with torch.no_grad():
        posterior = vae.encode(batch).latent_dist
        samples = posterior.sample(generator=gen)
    return {S.CLEAN: posterior.mean[0].to(storage).cpu(), S.NOISY: samples[1:].to(storage).cpu(),
            S.SIGMA: sigma.float()}


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


class _DecodeJobs:
    """Decode + resize in DataLoader workers. A damaged or unreadable file comes back as an error string; any
    other exception is a bug and propagates (from a worker process the DataLoader raises it again here)."""

    def __init__(self, jobs: list[VideoJob], resize: str, i2v: bool):
        self.jobs, self.resize, self.i2v = jobs, resize, i2v

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> dict:
        import torch

        job = self.jobs[i]
        b = job.bucket
        try:
            frames = resize_to_bucket(read_frames(job.path, job.window.indices), b.height, b.width, self.resize)
            out = {"index": i, "frames": torch.from_numpy(frames)}
            if self.i2v:
                first = read_frames(job.image, [0]) if job.image is not None else frames[:1]
                out["image"] = torch.from_numpy(resize_to_bucket(first, b.height, b.width, self.resize)[0])
            return out
        except INPUT_ERRORS as e:
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            return {"index": i, "error": text if str(job.path) in text else f"{job.path}: {text}"}


def _keep(x):
    return x


def _decoded(jobs: list[VideoJob], resize: str, i2v: bool, options: RunOptions):
    import torch

    loader = torch.utils.data.DataLoader(
        _DecodeJobs(jobs, resize, i2v), batch_size=None, shuffle=False, num_workers=options.workers,
        collate_fn=_keep, prefetch_factor=4 if options.workers else None, persistent_workers=False,
    )
    for decoded in tqdm(loader, total=len(jobs), desc="clips", unit="clip", disable=not options.progress):
        yield jobs[decoded["index"]], decoded


def _first_missing(path: Path) -> Path | None:
    """The topmost folder of `path` (itself included) that does not exist yet; None where `path` exists."""
    missing = None
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing = folder
    return missing


def _compute_device(options: RunOptions, local_rank: int) -> tuple[torch.device, torch.dtype]:
    """Where and in what dtype the VAE and T5 run: ``auto`` is cuda:LOCAL_RANK in bfloat16, else cpu in float32."""
    import torch

    if options.device == "auto":
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(options.device)
    if options.compute_dtype != "auto":
        return device, parse_dtype(options.compute_dtype)
    return device, torch.float32 if device.type == "cpu" else torch.bfloat16


def _loc(loc: S.Location) -> list:
    return [loc.shard, loc.offset, loc.size]


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
    want = hash_json([text_fp, prompts, [str(p) for p in images]])
    return meta.get("inputs") != want


def _make_extras(tokenizer, text_encoder, settings, text_fp, options, device, storage):
    """extras.safetensors' tensors and metadata (written once every shard of the run is closed)."""
    import torch

    prompts, images = _validation_inputs(options)
    embeds, _ = encode_prompts(tokenizer, text_encoder, [""] + prompts, settings.text_length, device)
    tensors = {"empty_embedding": embeds[0].to(storage)}
    for i, e in enumerate(embeds[1:]):
        tensors[f"validation_embedding_{i}"] = e.to(storage)
    for i, p in enumerate(images):
        tensors[f"validation_image_{i}"] = torch.from_numpy(read_frames(p, [0])[0].copy())
    meta = {"inputs": hash_json([text_fp, prompts, [str(p) for p in images]]),
            "validation_prompts": json.dumps(prompts)}
    return tensors, meta


def _pending_lists(store: Path) -> list[dict[str, Any]]:
    """What every rank of this run wrote and failed to decode: {"texts", "videos", "failures"} per rank."""
    return [json.loads(pending.read_text()) for pending in sorted((store / PENDING).glob("*.json"))]


def _nothing_to_encode(dataset: Dataset, skipped: list[BadItem]) -> CogtuneError:
    """The refusal of an encode that would commit no sample: an empty dataset, or one whose every entry is bad."""
    if not skipped:
        return CogtuneError(f"{dataset.file}: the dataset lists no samples; nothing to encode")
    return CogtuneError(f"{dataset.file}: all {len(skipped)} entries of the dataset are bad, no sample to encode "
                        f"(first: {skipped[0].reason})")


def _commit(store: Path, model: Model, plan: Plan, settings: EncodeSettings, spec: BucketSpec,
            fps: dict[str, str], dataset_info: dict[str, Any], lists: list[dict[str, Any]],
            result: EncodeResult) -> None:
    """Rank 0: merge every rank's new items (`lists`, see `_pending_lists`) with the known ones, write the index
    (the commit), the manifest."""
    videos = dict(plan.video_locations)
    texts = dict(plan.text_locations)
    failures: dict[str, str] = {}
    result.encoded_videos = result.encoded_texts = 0  # every rank's work, from the lists they left
    for data in lists:
        result.encoded_videos += len(data["videos"])
        result.encoded_texts += len(data["texts"])
        for key, members in data["videos"].items():
            videos[key] = {m: S.Location(*loc) for m, loc in members.items()}
        for key, (shard, offset, size, tokens) in data["texts"].items():
            texts[key] = (S.Location(shard, offset, size), tokens)
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
    counts = Counter(r["bucket"] for r in rows)
    buckets = []
    for name in sorted(counts):
        f, h, w = (int(x) for x in name.split("x"))
        buckets.append({"name": name, "frames": f, "height": h, "width": w,
                        "batch_size": spec.batch_size_for(Bucket(f, h, w)), "samples": counts[name]})
    manifest = S.Manifest(
        model={"source": model.source, "path": str(model.path), "variant": model.variant.name, "fingerprints": fps,
               "configs": model.config_fingerprint(("vae", "text_encoder")),
               # what cogtrain checks the model's weights against: `fps` would make it read every byte
               "weights_identity": model.weights_identity(("vae", "text_encoder"))},
        settings=settings.to_json(),
        dataset=dataset_info,
        buckets=buckets,
        software=software_versions(),
    )
    S.write_index(store, rows, manifest)  # the commit point: rows and manifest together
    _test_kill("index")
    # the plan re-encoded what cogprep verify found damaged: the new index points at none of it
    S.write_damaged(store, {}, [])
    S.atomic_write_text(store / S.STORE_JSON, manifest.to_json())  # the readable copy
    shutil.rmtree(store / PENDING, ignore_errors=True)
    result.samples = len(rows)
    result.skipped = skipped


def _write_report(store: Path, result: EncodeResult) -> None:
    report = {
        "samples": result.samples,
        "encoded": {"videos": result.encoded_videos, "texts": result.encoded_texts},
        "changes": {k: len(v) for k, v in result.plan.changes.items()},
        "skipped": [{"source": b.source, "reason": b.reason, "kind": skip_kind(b.reason)} for b in result.skipped],
        "seconds": round(result.seconds, 3),
    }
    S.atomic_write_text(store / S.REPORT, json.dumps(report, indent=2))



