"""`cogprep verify STORE`: read back every member the index points at, and record the damaged ones so that the
next `cogprep encode` re-encodes exactly those items from their sources.

Two passes. Sizes first: a stat of the shard, so a missing or short shard condemns the members past its end
without reading anything. Then contents: every member is read once (a caption's embedding shared by many
samples too) and its tensors' names, shapes and dtypes are compared with what the index and store.json say
they are. How the bytes are checked depends on what the index recorded:

  * a member with a recorded CRC-32 of its stored bytes (see shared/store.py): the CRC of the bytes read is
    compared with it, and only the safetensors header is inflated for the names, shapes and dtypes. The CRC
    proves the bytes are those written, and zlib's crc32 runs at about 2 GB/s a core, so verify reads at the
    disk's speed;
  * a member without one (a store written before the CRCs were recorded, an adopted item of a killed run), and
    every member with ``deep``: gunzipped in full (which checks gzip's own CRC and length) and parsed as
    safetensors. Inflating runs at about 100 MB/s a core, a tenth or less of an NVMe drive's read.

The contents pass is split into chunks of at most CHUNK_BYTES of consecutive members of one shard (a large
shard spreads over every worker, and a store of few shards still uses all the cores), read on a pool of threads,
one per core by default, each chunk in file order. Threads, not processes: zlib's inflate and crc32 release
the GIL, which is held only for the copies around them (gzip's slicing, safetensors' buffers), a few percent of
a member's time; a thread pool starts at once and needs no pickling. `scripts/bench_faults.py` measures the
cores it keeps busy. Memory stays bounded: a worker holds one member at a time (its bytes, inflated and parsed).

The damaged items go to ``STORE/damaged.json`` (atomically, under the store lock). Planning treats them as not
cached: `cogprep status` counts their sources as changed and exits 1, and `cogprep encode` encodes them again;
its commit clears the record.
"""

from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..shared import store as S


@dataclass(frozen=True)
class Member:
    """One cached member the index points at, and what its tensors must look like."""

    shard: str
    offset: int
    size: int
    item: str
    """The item key it belongs to (video_key or text_key): what re-encoding replaces."""
    kind: str
    """latent, image or text."""
    expect: tuple
    """(frames, height, width) of the sample's bucket for latent and image members; () for text."""
    crc: int | None = None
    """The CRC-32 of its stored bytes the index records; None where it records none."""


@dataclass
class VerifyResult:
    members: int = 0
    bytes_read: int = 0
    inflated: int = 0
    """Members checked by inflating them in full: those without a recorded CRC, or all of them (`deep`)."""
    damaged_items: dict[str, str] = field(default_factory=dict)
    """item key -> what is wrong with (the first damaged member of) it."""
    damaged_samples: list[dict[str, Any]] = field(default_factory=list)
    """Index rows (key, source, caption, bucket) with at least one damaged member, and the problem."""


CHUNK_BYTES = 64 << 20
"""Most bytes of members one task of the pool reads: big enough that a task's seeks and start cost nothing,
small enough that a 1 GiB shard spreads over 16 workers."""


def default_workers() -> int:
    """One worker per core this process may run on (its affinity, which containers and SLURM narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity call
        return os.cpu_count() or 1


def verify_store(store: Path, workers: int = 0, progress: bool = True, deep: bool = False) -> VerifyResult:
    """Check every member the index of `store` points at on `workers` threads (0: `default_workers()`), with
    `deep` by inflating every member, not only those without a recorded CRC; returns what is damaged (records
    nothing)."""
    store = Path(store)
    manifest = S.Manifest.load(store)
    rows = S.read_index(store)
    members, rows_of_item = _members(rows)
    expected = Expected(manifest.settings.get("dtype", "bfloat16"), manifest.settings.get("text_length"), deep)
    result = VerifyResult(members=len(members), bytes_read=sum(m.size for m in members),
                          inflated=sum(deep or m.crc is None for m in members))
    bar = tqdm(total=result.bytes_read, unit="B", unit_scale=True, desc="verify", disable=not progress)

    def check(chunk: list[Member]) -> list[tuple[Member, str]]:
        return _check_chunk(store / chunk[0].shard, chunk, expected, bar)

    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        for found in pool.map(check, _chunks(members, CHUNK_BYTES)):
            for member, problem in found:
                result.damaged_items.setdefault(member.item, problem)
    bar.close()
    seen: set[str] = set()
    for item, problem in result.damaged_items.items():
        for i in rows_of_item[item]:
            row = rows[i]
            if row["key"] not in seen:
                seen.add(row["key"])
                result.damaged_samples.append({k: row[k] for k in ("key", "source", "caption", "bucket")}
                                              | {"problem": problem})
    return result


def _chunks(members: list[Member], chunk_bytes: int) -> list[list[Member]]:
    """The members in runs of consecutive members of one shard, in file order, each of at most `chunk_bytes`
    (or one member, where a member alone is larger)."""
    chunks: list[list[Member]] = []
    size = 0
    for member in sorted(members, key=lambda m: (m.shard, m.offset)):
        if not chunks or chunks[-1][0].shard != member.shard or size + member.size > chunk_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(member)
        size += member.size
    return chunks


@dataclass(frozen=True)
class Expected:
    """What every member is checked against, and how."""

    dtype: str
    """The tensors' dtype (store.json's encode settings); the I2V noise levels (SIGMA) are float32 whatever it is."""
    text_length: int | None
    """Rows of a T5 embedding (store.json's encode settings)."""
    deep: bool
    """Inflate every member in full, even where the index records the CRC of its stored bytes."""


def _check_chunk(path: Path, chunk: list[Member], expected: Expected, bar: tqdm) -> list[tuple[Member, str]]:
    """The damaged members of one chunk of one shard, and what is wrong with each: a missing or short shard by
    its size alone, the rest by reading them."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        bar.update(sum(m.size for m in chunk))
        return [(m, f"{path}: missing") for m in chunk]
    found = []
    with open(path, "rb") as f:
        for member in chunk:
            if member.offset + member.size > size:
                found.append((member, f"{path}: truncated at byte {size}, the member ends at "
                                      f"{member.offset + member.size}"))
            else:
                f.seek(member.offset)
                problem = _check_member(f.read(member.size), member, expected)
                if problem:
                    found.append((member, f"{path} at byte {member.offset}: {problem}"))
            bar.update(member.size)
    return found


def record_damage(store: Path, result: VerifyResult) -> None:
    """Write (or clear, when nothing is damaged) the store's record of damaged items; hold the store lock."""
    S.write_damaged(store, result.damaged_items, result.damaged_samples)


def _members(rows: list[dict[str, Any]]) -> tuple[list[Member], dict[str, list[int]]]:
    """Every distinct member the rows point at, and the rows of each item."""
    members: dict[tuple[str, int], Member] = {}
    rows_of_item: dict[str, list[int]] = defaultdict(list)
    kinds = {S.LATENT: "latent", S.IMAGE: "image"}
    for i, row in enumerate(rows):
        size = (row["frames"], row["height"], row["width"])
        video, text = S.row_locations(row)
        located = [(loc, row["video_key"], kinds[member], size) for member, loc in video.items()]
        for loc, item, kind, expect in [*located, (text, row["text_key"], "text", ())]:
            members.setdefault((loc.shard, loc.offset),
                               Member(loc.shard, loc.offset, loc.size, item, kind, expect, loc.crc))
        rows_of_item[row["video_key"]].append(i)
        rows_of_item[row["text_key"]].append(i)
    return list(members.values()), rows_of_item


def _check_member(data: bytes, member: Member, expected: Expected) -> str | None:
    """What is wrong with one member's bytes, or None: their CRC against the recorded one and the safetensors
    header alone, or (no CRC recorded, or `deep`) everything inflated."""
    if member.crc is not None:
        crc = S.stored_crc(data)
        if crc != member.crc:
            return f"stored bytes changed since they were written (CRC-32 {crc:08x}, recorded {member.crc:08x})"
    try:
        if member.crc is None or expected.deep:
            tensors = S.tensors_from_bytes(data)
            header = {name: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in tensors.items()}
            del tensors
        else:
            header = S.tensor_header(data)
    except S.DamagedMember as e:
        return str(e)
    return _check_tensors(header, member, expected)


def _check_tensors(header: dict[str, tuple[str, tuple[int, ...]]], member: Member, expected: Expected) -> str | None:
    """What is wrong with a member's tensors ({name: (dtype, shape)}) for its kind and bucket, or None."""
    dtype, text_length = expected.dtype, expected.text_length
    wrong_dtype = sorted(k for k, (t_dtype, _) in header.items() if k != S.SIGMA and t_dtype != dtype)
    if wrong_dtype:
        return f"{', '.join(wrong_dtype)}: not {dtype}"
    shapes = {name: shape for name, (_, shape) in header.items()}
    if member.kind == "text":
        embedding = shapes.get(S.EMBEDDING)
        if embedding is None or len(embedding) != 2 or (text_length and embedding[0] != text_length):
            return f"embedding of shape {embedding}, expected [{text_length}, D]"
        return None
    frames, height, width = member.expect
    grid = ((frames - 1) // 4 + 1, height // 8, width // 8)  # the VAE's 4x temporal, 8x spatial compression
    if member.kind == "latent":
        mean, logvar = shapes.get(S.MEAN), shapes.get(S.LOGVAR)
        if mean is None or logvar is None or len(mean) != 4 or mean[1:] != grid or logvar != mean:
            return f"latent of shape {mean}, expected [C, {', '.join(map(str, grid))}]"
        return None
    clean, noisy, sigma = shapes.get(S.CLEAN), shapes.get(S.NOISY), shapes.get(S.SIGMA)
    if clean is None or noisy is None or sigma is None or clean[1:] != (1, *grid[1:]) or noisy[1:] != clean \
            or noisy[:1] != sigma[:1]:
        return "image latents of the wrong names or shapes"
    return None
