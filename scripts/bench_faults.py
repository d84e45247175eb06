"""Benchmark the store checks that must stay fast on a large store: cogtrain's start-up shard check and
`cogprep verify`, each against a baseline measured in the same run.

    python scripts/bench_faults.py [--samples 1000000] [--shards 1000] [--verify-samples 300]
                                   [--latent 16x13x30x45] [--workers 1,2] [--page-cache warm]
                                   [--json-out bench.json]

(a) start-up check: an index of N samples spread over S video shards and S/10 text shards (sparse files of the
    length the index needs), loaded as the trainer loads it (`IndexColumns`) and checked (`check_shards`: one
    stat per shard). Reported: the check alone, and the index load it comes with. Target: the check < 2 s at
    1,000,000 samples.
(b) verify: a store of M samples of random bfloat16 latents (mean + log-variance of the given shape, gzip
    level 1 as cogprep writes them) and one caption each, read back by `verify_store` as `cogprep verify` does
    (each member's stored bytes against the CRC-32 the index records, and its safetensors header) and as
    `cogprep verify --deep` does (every member inflated); their rates in MB/s of shard bytes, against reading
    the same files plainly, sequentially, in this run. Every read finds the page cache alike: with
    --page-cache warm (the default) the shards are read once beforehand and stay in memory, so the figures are
    the CPU's cost of each way of reading; with cold the cache is dropped before each read (root only; it slows
    everything else on the machine for a while), so they are the disk's. Target: verify within 2x of the plain
    read. Each way runs once per --workers count, and for each the table gives its MB/s, the cores it kept busy
    (CPU seconds of all its threads over wall seconds: near the worker count when its threads really run in
    parallel, near 1 if the GIL serialised them) and its MB per CPU second, the rate one core gives, which other
    jobs on the machine do not change. From that rate: the cores each way needs to read at the plain read's
    speed here, and at a few common disks' speeds. gunzip and crc32 alone on one thread, from memory, in MB per
    CPU second, are the ceilings beside them.
Prints a table, then the results as JSON.
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from bench_report import print_json
from cogtune.preprocess.verify import verify_store
from cogtune.shared import store as S

TARGET_CHECK_SECONDS = 2.0
TARGET_VERIFY_SLOWDOWN = 2.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000, help="index rows of the start-up check's store")
    parser.add_argument("--shards", type=int, default=1000, help="video shards they point into")
    parser.add_argument("--verify-samples", type=int, default=300, help="samples of the store verify reads")
    parser.add_argument("--latent", default="16x13x30x45", help="latent shape C x F x H x W of those samples")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each measure (the median is kept)")
    parser.add_argument("--workers", default="1,2",
                        help="comma-separated worker counts verify is measured with (default 1,2)")
    parser.add_argument("--page-cache", choices=("warm", "cold"), default="warm",
                        help="warm: the shards stay in memory for every read (the CPU's cost); cold: dropped before "
                             "each read (the disk's speed; root only)")
    parser.add_argument("--json-out", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        results = {
            "settings": vars(args) | {"json_out": str(args.json_out) if args.json_out else None},
            "a_startup_check": measure_startup_check(Path(tmp) / "large", args.samples, args.shards, args.rounds),
            "b_verify": measure_verify(Path(tmp) / "verify", args.verify_samples,
                                       tuple(int(x) for x in args.latent.split("x")), args.rounds,
                                       [int(n) for n in args.workers.split(",")], args.page_cache == "cold"),
        }
    results["pass"] = {
        "startup_check": results["a_startup_check"]["check_s"] < TARGET_CHECK_SECONDS,
        "verify": results["b_verify"]["slowdown_vs_plain_read"] <= TARGET_VERIFY_SLOWDOWN,
    }
    print_table(results)
    print_json(results, args.json_out)


# ---------------------------------------------------------------------------------------------------------
# (a) the start-up check on a large index


def write_large_index(store: Path, samples: int, shards: int) -> None:
    """index.parquet of `samples` rows over `shards` video shards, each shard a sparse file as long as its rows
    need; the columns the check does not read hold cheap placeholders."""
    latent_size, text_size = 600_000, 1_000_000
    per_shard = -(-samples // shards)
    row = np.arange(samples)
    shard_number, slot = row // per_shard, row % per_shard
    text_shards = max(1, shards // 10)
    text_number, text_slot = row % text_shards, row // text_shards
    video_names = [f"{S.SHARDS}/49x480x720/bench-{i:05d}.tar" for i in range(shards)]
    text_names = [f"{S.SHARDS}/{S.TEXT_BUCKET}/bench-{i:05d}.tar" for i in range(text_shards)]
    columns = {
        "shard": pa.DictionaryArray.from_arrays(shard_number.astype(np.int32), video_names).cast(pa.string()),
        "latent_offset": pa.array(slot * latent_size + 512, pa.int64()),
        "latent_size": pa.array(np.full(samples, latent_size - 1024), pa.int64()),
        "image_offset": pa.array(np.full(samples, -1), pa.int64()),
        "image_size": pa.array(np.zeros(samples, np.int64)),
        "text_shard": pa.DictionaryArray.from_arrays(text_number.astype(np.int32), text_names).cast(pa.string()),
        "text_offset": pa.array(text_slot * text_size + 512, pa.int64()),
        "text_size": pa.array(np.full(samples, text_size - 1024), pa.int64()),
        "bucket": pa.array(["49x480x720"] * samples, pa.string()),
    }
    schema = pa.schema([S.INDEX_SCHEMA.field(name) for name in columns])
    store.mkdir(parents=True)
    pq.write_table(pa.table(columns, schema=schema), store / S.INDEX)
    for names, count, size in ((video_names, per_shard, latent_size), (text_names, -(-samples // text_shards),
                                                                         text_size)):
        for name in names:
            path = store / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.truncate(count * size)  # sparse: the length the index needs, no blocks written


def measure_startup_check(store: Path, samples: int, shards: int, rounds: int) -> dict:
    write_large_index(store, samples, shards)
    loads, checks = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        index = S.IndexColumns(store, ("bucket", *S.SAMPLE_COLUMNS))
        loaded = time.perf_counter()
        S.check_shards(store, index)
        checks.append(time.perf_counter() - loaded)
        loads.append(loaded - started)
    return {"samples": samples, "shards": len(index.shard_extents()), "index_load_s": statistics.median(loads),
            "check_s": statistics.median(checks)}


# ---------------------------------------------------------------------------------------------------------
# (b) verify against a plain read


def write_store(store: Path, samples: int, latent: tuple[int, ...]) -> None:
    """A store of random bf16 latents and embeddings, written through the store's own writer."""
    generator = torch.Generator().manual_seed(0)
    video, text = S.ShardWriter(store, "49x240x360", "bench", max_items=100), S.ShardWriter(store, S.TEXT_BUCKET,
                                                                                           "bench", max_items=1000)
    frames, height, width = (latent[1] - 1) * 4 + 1, latent[2] * 8, latent[3] * 8
    rows = []
    for i in range(samples):
        mean, logvar = (torch.randn(latent, generator=generator).bfloat16() for _ in range(2))
        where = video.add(f"v{i:08d}", {S.LATENT: S.tensors_to_bytes({S.MEAN: mean, S.LOGVAR: logvar})})
        embedding = torch.randn(226, 64, generator=generator).bfloat16()
        said = text.add(f"t{i:08d}", {S.TEXT: S.tensors_to_bytes({S.EMBEDDING: embedding})})
        rows.append({
            "key": f"k{i:08d}", "source": f"videos/{i}.mp4", "kind": "video", "bucket": f"{frames}x{height}x{width}",
            "frames": frames, "height": height, "width": width, "caption": f"caption {i}", "clip_start": 0,
            "clip_step": 1.0, "source_size": 1, "source_mtime_ns": 1, "source_hash": "h", "video_key": f"v{i:08d}",
            "text_key": f"t{i:08d}", **S.location_columns(where, said[S.TEXT]), "text_tokens": 4,
        })
    video.close()
    text.close()
    S.write_index(store, rows, S.Manifest(model={"variant": "bench"}, settings={"dtype": "bfloat16",
                                                                               "text_length": 226},
                                          dataset={"path": "bench"}, buckets=[]))


def drop_page_cache() -> bool:
    """Ask the kernel to forget cached file pages, so that reads come from the disk; False where not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def plain_read(store: Path) -> int:
    total = 0
    for path in sorted((store / S.SHARDS).rglob("*.tar")):
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                total += len(chunk)
    return total


def stored_members(store: Path) -> list[bytes]:
    """Every member's stored bytes, in memory."""
    members = []
    for row in S.read_index(store):
        for shard, offset, size in ((row["shard"], row["latent_offset"], row["latent_size"]),
                                    (row["text_shard"], row["text_offset"], row["text_size"])):
            with open(store / shard, "rb") as f:
                f.seek(offset)
                members.append(f.read(size))
    return members


def one_core_seconds(members: list[bytes], check) -> float:
    """CPU seconds `check` takes over every member on one thread, from memory: the CPU cost under one way of
    verifying (CPU seconds, not wall: the machine's other jobs do not change them)."""
    started = time.process_time()
    for data in members:
        check(data)
    return time.process_time() - started


DISK_MB_S = {"a SATA SSD (550 MB/s)": 550, "a PCIe 3 NVMe (3,000 MB/s)": 3000, "a PCIe 4 NVMe (7,000 MB/s)": 7000}
"""Sequential read speeds of common disks, in MB/s: what the cores-needed projection is given for."""


def timed(read) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all this process's threads) of one call of `read`."""
    started, cpu = time.perf_counter(), time.process_time()
    read()
    return time.perf_counter() - started, time.process_time() - cpu


def checked_verify(store: Path, workers: int, deep: bool) -> None:
    result = verify_store(store, workers=workers, progress=False, deep=deep)
    assert not result.damaged_items, result.damaged_items
    assert result.inflated == (result.members if deep else 0), result.inflated  # the path this run measures


def rates(shard_mb: float, measured: list[tuple[float, float]], plain_s: float) -> dict:
    wall = statistics.median(w for w, _ in measured)
    cpu = statistics.median(c for _, c in measured)
    return {"mb_s": shard_mb / wall, "cores_busy": cpu / wall, "mb_per_cpu_s": shard_mb / cpu,
            "slowdown_vs_plain_read": wall / plain_s}


def measure_verify(store: Path, samples: int, latent: tuple[int, ...], rounds: int, workers: list[int],
                   cold: bool) -> dict:
    write_store(store, samples, latent)
    shard_mb = sum(p.stat().st_size for p in (store / S.SHARDS).rglob("*.tar")) / 2**20
    members = stored_members(store)
    inflate_s = statistics.median(one_core_seconds(members, gzip.decompress) for _ in range(rounds))
    crc_s = statistics.median(one_core_seconds(members, zlib.crc32) for _ in range(rounds))
    del members
    ways = {"verify": False, "deep": True}
    plain, runs = [], {(way, n): [] for way in ways for n in workers}
    dropped = not cold or drop_page_cache()
    plain_read(store)  # warm: every page in memory for every read below (cold: dropped again before each)
    for _ in range(rounds):  # interleaved, so that a change in the machine's load touches every measure alike
        if cold:
            dropped &= drop_page_cache()
        plain.append(timed(lambda: plain_read(store)))
        for (way, n), measured in runs.items():
            if cold:
                dropped &= drop_page_cache()
            measured.append(timed(lambda: checked_verify(store, n, ways[way])))
    plain_s = statistics.median(w for w, _ in plain)
    plain_mb_s = shard_mb / plain_s
    out = {"samples": samples, "members": 2 * samples, "shard_mb": shard_mb, "plain_read_mb_s": plain_mb_s,
           "plain_read_mb_per_cpu_s": shard_mb / statistics.median(c for _, c in plain)}
    for way in ways:
        by_workers = {str(n): rates(shard_mb, runs[way, n], plain_s) for n in workers}
        per_core = statistics.median(w["mb_per_cpu_s"] for w in by_workers.values())
        prefix = "" if way == "verify" else "deep_"
        out |= {f"{prefix}by_workers": by_workers, f"{way}_mb_s": by_workers[str(max(workers))]["mb_s"],
                f"{prefix}slowdown_vs_plain_read": by_workers[str(max(workers))]["slowdown_vs_plain_read"],
                f"{way}_mb_per_core_s": per_core,
                f"{prefix}cores_for_disk_speed": {"the plain read here": math.ceil(plain_mb_s / per_core)}
                | {name: math.ceil(speed / per_core) for name, speed in DISK_MB_S.items()}}
    return out | {"page_cache": "dropped before each read" if cold and dropped else "warm: every read from memory",
                  "page_cache_dropped": cold and dropped, "cores": os.cpu_count(),
                  "load_average_1min": os.getloadavg()[0], "inflate_one_core_mb_s": shard_mb / inflate_s,
                  "crc32_one_core_mb_s": shard_mb / crc_s}


def print_table(results: dict) -> None:
    a, b, passed = results["a_startup_check"], results["b_verify"], results["pass"]
    store = f"{b['samples']} samples ({b['shard_mb']:.0f} MB)"
    rows = [
        (f"start-up shard check, {a['samples']:,} samples / {a['shards']} shards", f"{a['check_s']:.3f} s",
         f"< {TARGET_CHECK_SECONDS} s", "PASS" if passed["startup_check"] else "FAIL"),
        ("  (the index load it comes with)", f"{a['index_load_s']:.3f} s", "", ""),
        ("plain sequential read of the verified shards: MB/s, MB per CPU s", f"{b['plain_read_mb_s']:.0f} MB/s",
         f"{b['plain_read_mb_per_cpu_s']:.0f}", ""),
        *[(f"{name}, {store}, {n} worker{'s' * (n != '1')}: MB/s, cores busy, MB per CPU s",
           f"{w['mb_s']:.0f} MB/s", f"{w['cores_busy']:.2f}", f"{w['mb_per_cpu_s']:.0f}")
          for name, key in (("verify (CRC)", "by_workers"), ("verify --deep", "deep_by_workers"))
          for n, w in b[key].items()],
        (f"crc32 alone, one thread, from memory: MB per CPU s ({b['cores']} cores here, load "
         f"{b['load_average_1min']:.1f})", f"{b['crc32_one_core_mb_s']:.0f}", "", ""),
        ("gunzip alone, one thread, from memory: MB per CPU s", f"{b['inflate_one_core_mb_s']:.0f}", "", ""),
        ("verify time / plain read time, most workers", f"{b['slowdown_vs_plain_read']:.2f}",
         f"<= {TARGET_VERIFY_SLOWDOWN}", "PASS" if passed["verify"] else "FAIL"),
        ("--deep time / plain read time, most workers", f"{b['deep_slowdown_vs_plain_read']:.2f}", "", ""),
        *[(f"cores {name} needs to keep up with {disk} at {b[rate]:.0f} MB/s a core", str(cores), "", "")
          for name, rate, key in (("verify", "verify_mb_per_core_s", "cores_for_disk_speed"),
                                  ("--deep", "deep_mb_per_core_s", "deep_cores_for_disk_speed"))
          for disk, cores in b[key].items()],
        ("page cache", b["page_cache"], "", ""),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, target, verdict in rows:
        print(f"{name:<{width}}  {value:>12}  {target:>8}  {verdict}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
