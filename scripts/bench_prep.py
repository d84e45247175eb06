"""Benchmark cogprep on a tiny model: encode throughput and stage overlap, the no-op re-run, bytes per sample.

    python scripts/bench_prep.py [--clips 6] [--frames 49] [--height 128] [--width 192] [--workers 1] [--threads 1]
                                 [--noop-entries 1000] [--json-out bench.json] [--keep DIR]

Everything is measured in one run on generated data, nothing is assumed:
  (a) full encode, clips/s: `cogprep encode` in this process (imports warm), wall clock;
  (b) decode only, clips/s: the encode's own decode stage (decord + resize in the same DataLoader workers);
  (c) encode only, clips/s: the encode's own VAE + T5 calls on the pre-decoded clips; and pack only: the
      safetensors + gzip of what they made (the encode runs it on a thread beside the VAE);
  (d) wall / slower stage: 1.0 is perfect overlap of decoding and packing with encoding (the encoder runs
      on --threads cores, 1 by default, so that on a CPU-only machine the stages do not fight for the cores:
      with every core given to the encoder, the decode workers can only slow it down);
  (e) a no-op re-run over a dataset of N entries (copies of a few short clips under N names);
  (f) bytes per sample against a naive layout (fp32 mean + logvar, fp32 226-token embedding), for the tiny
      model as encoded, and for CogVideoX-5b at 49x480x720 (text dim 4096) from the store's measured overhead
      and gzip ratios (see `bytes_per_sample`).
Prints a table with targets and PASS/FAIL, then the results as JSON.

    python scripts/bench_prep.py real-size [--device cuda|cpu] [--vae-clip FxHxW] [--t5-layers K] ...

measures the real VAE and T5-XXL architectures instead (random weights): a 49x480x720 and an 81x768x1360 clip
encoded, a 226-token caption embedded, peak memory, clips per minute (scripts/bench_prep_real.py; its --help
lists its options).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cogtune
import numpy as np
import torch
from bench_report import print_json
from cogtune.preprocess import compute as ops
from cogtune.preprocess import encode as E
from cogtune.preprocess.cli import app
from cogtune.preprocess.datasets import read_dataset
from cogtune.preprocess.frames import FrameSampling
from cogtune.preprocess.plan import EncodeSettings, plan_encode
from cogtune.shared import store as S
from cogtune.shared.buckets import BucketSpec
from cogtune.shared.fingerprint import FileHashes
from cogtune.shared.models import open_model, parse_dtype
from cogtune.shared.video import write_video
from cogtune.shared.zoo import TINY_NATIVE, make_tiny_model
from typer.testing import CliRunner

TARGET_OVERLAP = 1.15
"""(d): full encode wall over the slower stage alone."""
TARGET_NOOP_SECONDS = 2.0
"""(e): a no-op re-run over 1,000 entries."""
TARGET_RATIO = 0.5
"""(f): the issue's target: bytes per sample at most half the naive layout. bf16 alone gives exactly 0.5 (cogtune
keeps all 226 rows of the T5 embedding, as the pipeline computes it), so what brings it under is the gzip of the
tensor members; the store's format and its reasons are in shared/store.py."""

REAL_5B = {"frames": 49, "height": 480, "width": 720, "latent_channels": 16, "text_length": 226, "text_dim": 4096}
COLOURS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["real-size"]:
        import bench_prep_real  # beside this script: on sys.path when it runs

        return bench_prep_real.main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="bench_prep.py real-size --help: the real-size models' options")
    parser.add_argument("--clips", type=int, default=6, help="clips of the throughput dataset (default 6)")
    parser.add_argument("--frames", type=int, default=49, help="bucket frames (8N+1, default 49)")
    parser.add_argument("--height", type=int, default=128, help="bucket height (default 128)")
    parser.add_argument("--width", type=int, default=192, help="bucket width (default 192)")
    parser.add_argument("--source-scale", type=float, default=2.0,
                        help="source videos are this many times the bucket size, so resizing costs (default 2)")
    parser.add_argument("--workers", type=int, default=1, help="decode workers (default 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the encoder (default 1: on a CPU-only machine the encoder keeps one "
                             "core and the decode workers get the rest, as the VAE gets its own silicon on a GPU "
                             "machine; 0: torch's default, every core, which measures core contention, not overlap)")
    parser.add_argument("--noop-entries", type=int, default=1000, help="entries of the no-op dataset (default 1000)")
    parser.add_argument("--json-out", type=Path, help="also write the results to this file")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-prep-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = run(args, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    print_json(results, args.json_out)


def run(args, work: Path) -> dict:
    started = time.time()
    model = make_tiny_model("5b", work / "model", seed=0)
    bucket = f"{args.frames}x{args.height}x{args.width}"
    source = (round(args.height * args.source_scale / 2) * 2, round(args.width * args.source_scale / 2) * 2)
    data = make_dataset(work / "clips", args.clips, args.frames + 8, *source)
    noop_data = make_noop_dataset(work / "noop", args.noop_entries)

    # The no-op dataset's first encode also warms every import, the models and torch's kernels before timing.
    native = "x".join(str(n) for n in TINY_NATIVE["1.0"])
    cogprep("encode", noop_data, "--model", model, "--out", work / "noop-store", "--resolution", native,
            "--workers", args.workers)

    store = work / "store"
    wall, waited = timed_with_decode_waits(lambda: cogprep("encode", data, "--model", model, "--out", store,
                                                           "--resolution", bucket, "--workers", args.workers))
    decode_s, encode_s, pack_s = stage_times(model, data, store, work / "empty-store", args.workers)
    noop_s, noop_process_s, noop_profile = noop_rerun(model, noop_data, work / "noop-store", native, args.workers)
    sizes = bytes_per_sample(store, model)

    slower = max(decode_s, encode_s, pack_s)
    return {
        "setup": {"clips": args.clips, "bucket": bucket, "source_size": f"{args.frames + 8}x{source[0]}x{source[1]}",
                  "workers": args.workers, "torch_threads": torch.get_num_threads(), "cpu_cores": os.cpu_count(),
                  "load_average_1min": round(os.getloadavg()[0], 2), "model": "tiny CogVideoX-5b (random)"},
        "a_full_encode_clips_per_s": round(args.clips / wall, 3),
        "a_full_encode_wall_s": round(wall, 2),
        "a_waited_for_decoded_clips_s": round(waited, 2),
        "b_decode_only_clips_per_s": round(args.clips / decode_s, 3),
        "c_encode_only_clips_per_s": round(args.clips / encode_s, 3),
        "c_pack_only_clips_per_s": round(args.clips / pack_s, 3),
        "d_wall_over_slower_stage": round(wall / slower, 3),
        "d_target": TARGET_OVERLAP,
        "e_noop_entries": args.noop_entries,
        "e_noop_rerun_s": round(noop_s, 3),
        "e_noop_rerun_process_s": round(noop_process_s, 2),
        "e_target_s": TARGET_NOOP_SECONDS,
        "e_profile": noop_profile,
        "f_bytes_per_sample": sizes,
        "f_target_ratio": TARGET_RATIO,
        "bench_seconds": round(time.time() - started, 1),
    }


# ---------------------------------------------------------------------------------------------------------
# data


def make_dataset(folder: Path, count: int, frames: int, height: int, width: int) -> Path:
    """A txt dataset of `count` clips: a shape crossing a two-colour gradient, one distinct caption each."""
    rng = np.random.default_rng(0)
    captions = []
    for i in range(count):
        shape, direction = SHAPES[i % len(SHAPES)], DIRECTIONS[i % len(DIRECTIONS)]
        colour, background = COLOURS[i % len(COLOURS)], COLOURS[(i * 3 + 1) % len(COLOURS)]
        write_video(folder / "videos" / f"clip_{i:03d}.mp4", render_clip(rng, frames, height, width, i), fps=16)
        captions.append(f"a {colour} {shape} moving {direction} over a {background} background {i}")
    write_list(folder / "videos.txt", [f"videos/clip_{i:03d}.mp4" for i in range(count)])
    write_list(folder / "prompts.txt", captions)
    return folder


def render_clip(rng, frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [F, H, W, 3]: a square moving over a gradient, with a little noise so the codec has work to do."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, np.full((height, width), (seed % 5) / 5)], -1) * 200
    video = np.repeat(base[None], frames, 0)
    side = height // 4
    for t in range(frames):
        left = int((width - side) * t / max(frames - 1, 1))
        video[t, height // 3 : height // 3 + side, left : left + side] = (240, 60 + 20 * (seed % 8), 30)
    video += rng.normal(0, 6, video.shape)
    return video.clip(0, 255).astype(np.uint8)


def make_noop_dataset(folder: Path, entries: int) -> Path:
    """`entries` listed videos: copies of 4 short clips under distinct names, captions cycling over 4."""
    rng = np.random.default_rng(1)
    frames, height, width = TINY_NATIVE["1.0"]
    originals = []
    for i in range(4):
        path = folder / "originals" / f"clip_{i}.mp4"
        write_video(path, render_clip(rng, frames + 3, height, width, i), fps=8)
        originals.append(path)
    names = []
    for n in range(entries):
        name = f"videos/entry_{n:05d}.mp4"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(originals[n % 4], folder / name)
        names.append(name)
    write_list(folder / "videos.txt", names)
    write_list(folder / "prompts.txt", [f"a {COLOURS[n % 4]} square moving up" for n in range(entries)])
    return folder


def write_list(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------------------------------
# measurements


def cogprep(*args) -> str:
    """`cogprep ARGS` in this process (imports stay warm between runs); fails loudly on a non-zero exit."""
    result = CliRunner().invoke(app, [str(a) for a in args] + ["--no-progress"])
    if result.exit_code != 0:
        raise SystemExit(f"cogprep {' '.join(map(str, args))}: exit {result.exit_code}\n{result.output}")
    return result.output


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_with_decode_waits(fn) -> tuple[float, float]:
    """(seconds `fn` takes, seconds of it the encoder spent waiting for the decode workers' next clip)."""
    waited = 0.0
    decoded = ops.decoded

    def waiting(*args, **kwargs):
        nonlocal waited
        clips = decoded(*args, **kwargs)
        while True:
            start = time.perf_counter()
            item = next(clips, None)
            waited += time.perf_counter() - start
            if item is None:
                return
            yield item

    ops.decoded = waiting  # the encode looks the stage up in its module at call time
    try:
        return timed(fn), waited
    finally:
        ops.decoded = decoded


def stage_times(model_path: Path, data: Path, store: Path, empty: Path, workers: int) -> tuple[float, float, float]:
    """(decode-only, encode-only, pack-only seconds) over the clips of `data`, with the settings `store` was made
    with: the same jobs, the same DataLoader workers, the same VAE and T5 calls, the same safetensors + gzip
    packing (the encode runs it on a thread beside the VAE) as the encode."""
    manifest = S.Manifest.load(store)
    st = manifest.settings
    settings = EncodeSettings(**{**st, "sampling": FrameSampling(**st["sampling"])})
    model = open_model(model_path, E.PREP_COMPONENTS)
    hashes = FileHashes(None)
    vae_fp, text_fp, _ = E.model_fingerprints(model, hashes)
    empty.mkdir(parents=True, exist_ok=True)
    plan = plan_encode(read_dataset(data), BucketSpec.from_json(st["buckets"]), settings, vae_fp, text_fp, empty, hashes,
                       model.variant.task)
    jobs = [plan.video_jobs[k] for k in sorted(plan.video_jobs)]
    options = E.RunOptions(workers=workers, progress=False)

    decoded = {}
    start = time.perf_counter()
    for job, item in ops.decoded(jobs, settings.resize, False, options.workers, options.progress):
        decoded[job.key] = item
    decode_s = time.perf_counter() - start

    device, compute = ops.compute_device(options.device, options.compute_dtype, 0)  # as the encode picks them
    vae = model.load_vae(compute, device)
    tokenizer, text_encoder = model.load_tokenizer(), model.load_text_encoder(compute, device)
    captions = list(plan.text_jobs.values())
    storage = parse_dtype(settings.dtype)
    start = time.perf_counter()
    items = []
    for at in range(0, len(captions), options.text_batch_size):
        embeds, _ = ops.encode_prompts(tokenizer, text_encoder, captions[at : at + options.text_batch_size],
                                       settings.text_length, device)
        items += [{S.EMBEDDING: e.to(storage)} for e in embeds]
    for job in jobs:
        members = ops.encode_video_item(vae, decoded[job.key], job, settings, device, compute, storage)
        items += [m for m in members.values() if not isinstance(m, bytes)]
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    for tensors in items:
        S.tensors_to_bytes(tensors)
    return decode_s, encode_s, time.perf_counter() - start


def noop_rerun(model: Path, data: Path, store: Path, resolution: str, workers: int) -> tuple[float, float, list]:
    """Seconds of a re-run that has nothing to do: in this process (the command's own work), and as a new
    process (what a user waits for, Python and torch imports included). Profiled when over the target."""
    args = ["encode", data, "--model", model, "--out", store, "--resolution", resolution, "--workers", workers]
    seconds = timed(lambda: cogprep(*args))
    report = json.loads((store / S.REPORT).read_text())
    if report["encoded"] != {"videos": 0, "texts": 0}:
        raise SystemExit(f"no-op re-run encoded {report['encoded']}: the bench's dataset changed under it")
    command = [sys.executable, "-c", "from cogtune.preprocess.cli import main; main()", *map(str, args),
               "--no-progress"]
    process_seconds = timed(lambda: subprocess.run(command, check=True, capture_output=True))
    profile = profile_noop(args) if seconds > TARGET_NOOP_SECONDS else []
    return seconds, process_seconds, profile


def profile_noop(args: list) -> list[str]:
    """The 15 cogtune functions with the most cumulative time in one more no-op re-run."""
    profiler = cProfile.Profile()
    profiler.runcall(cogprep, *args)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("cumulative")
    stats.print_stats(re.escape(str(Path(cogtune.__file__).parent)), 15)
    return [line for line in out.getvalue().splitlines() if "{" not in line and line.strip()][-16:]


def bytes_per_sample(store: Path, model_path: Path) -> dict:
    """The store's bytes per sample against the naive fp32 layout, measured on the tiny store, and projected to
    CogVideoX-5b at 49x480x720: bf16 tensors, gzipped by the worse of the tiny store's ratio and a real-size
    N(0, 1) bf16 tensor's (real latents and embeddings cannot be made without the real weights), plus the
    per-item overhead (tar headers, JSON, index row) measured here."""
    rows = S.read_index(store)
    reader = S.ShardReader(store)
    raw = {"video": 0, "text": 0}
    packed = {"video": 0, "text": 0}
    naive = 0
    for r in rows:
        tensors = S.read_sample(reader, r)
        raw["video"] += sum(tensor_bytes(tensors[k]) for k in (S.MEAN, S.LOGVAR))
        raw["text"] += tensor_bytes(tensors[S.EMBEDDING])
        packed["video"] += r["latent_size"]
        packed["text"] += r["text_size"]
        naive += 4 * (2 * tensors[S.MEAN].numel() + tensors[S.EMBEDDING].numel())
    reader.close()
    if len({r["text_key"] for r in rows}) != len(rows):
        raise SystemExit("the bench's captions must differ: a shared caption is stored once and would flatter (f)")
    parts = S.bytes_by_part(store)
    on_disk = sum(parts.values())
    n = len(rows)
    ratio = {part: packed[part] / raw[part] for part in raw}
    overhead = {"video_item": (parts["video shards"] - packed["video"]) / n,
                "text_item": (parts["text shards"] - packed["text"]) / n, "index_row": parts[S.INDEX] / n}

    real = REAL_5B
    latent = real["latent_channels"] * ((real["frames"] - 1) // 4 + 1) * (real["height"] // 8) * (real["width"] // 8)
    embedding = real["text_length"] * real["text_dim"]
    gaussian = torch.randn(2 * latent, generator=torch.Generator().manual_seed(0)).bfloat16()
    gaussian_ratio = len(S.tensors_to_bytes({"x": gaussian})) / tensor_bytes(gaussian)
    # the tiny T5's padding rows are near copies of each other and gzip far better than a real T5's would:
    # project each part with the worse of its tiny ratio and the Gaussian's
    projected = {part: max(r, gaussian_ratio) for part, r in ratio.items()}
    real_store = 2 * (2 * latent * projected["video"] + embedding * projected["text"]) + sum(overhead.values())
    real_naive = 4 * (2 * latent + embedding)
    return {
        "tiny_store_bytes_per_sample": round(on_disk / n),
        "tiny_naive_bytes_per_sample": round(naive / n),
        "tiny_ratio": round(on_disk / naive, 4),
        "gzip_ratio_of_bf16": {"video_items": round(ratio["video"], 4), "text_items": round(ratio["text"], 4),
                               "real_size_gaussian": round(gaussian_ratio, 4)},
        "overhead_bytes_per_sample": {k: round(v) for k, v in overhead.items()},
        "cogvideox_5b_store_bytes_per_sample": round(real_store),
        "cogvideox_5b_naive_bytes_per_sample": real_naive,
        "cogvideox_5b_ratio": round(real_store / real_naive, 4),
        "cogvideox_5b_ratio_uncompressed": round((2 * (2 * latent + embedding) + sum(overhead.values()))
                                                 / real_naive, 4),
    }


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------------------
# report


def print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def verdict(ok: bool) -> str:
        return "[green]PASS[/green]" if ok else "[red]FAIL[/red]"

    f = r["f_bytes_per_sample"]
    s = r["setup"]
    table = Table(title=f"cogprep bench: {s['clips']} clips at {s['bucket']} from {s['source_size']} sources, "
                        f"{s['workers']} workers, {s['cpu_cores']} cores (load {s['load_average_1min']})",
                  title_justify="left")
    for name in ("measure", "value", "target", "result"):
        table.add_column(name, justify="left" if name == "measure" else "right")
    table.add_row("(a) full encode", f"{r['a_full_encode_clips_per_s']:.3f} clips/s", "", "")
    table.add_row("    of its wall, waiting for decoded clips",
                  f"{r['a_waited_for_decoded_clips_s']:.2f} of {r['a_full_encode_wall_s']:.2f} s", "", "")
    table.add_row("(b) decode only", f"{r['b_decode_only_clips_per_s']:.3f} clips/s", "", "")
    table.add_row("(c) encode only (VAE + T5)", f"{r['c_encode_only_clips_per_s']:.3f} clips/s", "", "")
    table.add_row("    pack only (safetensors + gzip)", f"{r['c_pack_only_clips_per_s']:.3f} clips/s", "", "")
    ratio = r["d_wall_over_slower_stage"]
    table.add_row("(d) wall / slower stage", f"{ratio:.3f}", f"<= {TARGET_OVERLAP}", verdict(ratio <= TARGET_OVERLAP))
    noop = r["e_noop_rerun_s"]
    table.add_row(f"(e) no-op re-run, {r['e_noop_entries']} entries", f"{noop:.3f} s", f"< {TARGET_NOOP_SECONDS} s",
                  verdict(noop < TARGET_NOOP_SECONDS))
    table.add_row("    same, as a new process (imports)", f"{r['e_noop_rerun_process_s']:.2f} s", "", "")
    table.add_row("(f) bytes/sample, tiny", f"{f['tiny_store_bytes_per_sample']} vs naive "
                  f"{f['tiny_naive_bytes_per_sample']} = {f['tiny_ratio']:.4f}", f"<= {TARGET_RATIO}",
                  verdict(f["tiny_ratio"] <= TARGET_RATIO))
    table.add_row("(f) bytes/sample, 5b 49x480x720", f"{f['cogvideox_5b_store_bytes_per_sample']} vs naive "
                  f"{f['cogvideox_5b_naive_bytes_per_sample']} = {f['cogvideox_5b_ratio']:.4f}",
                  f"<= {TARGET_RATIO}", verdict(f["cogvideox_5b_ratio"] <= TARGET_RATIO))
    g = f["gzip_ratio_of_bf16"]
    table.add_row("    gzip of bf16: video, text items; real-size N(0,1)",
                  f"{g['video_items']:.3f}, {g['text_items']:.3f}; {g['real_size_gaussian']:.3f}", "", "")
    table.add_row("    5b without gzip", f"{f['cogvideox_5b_ratio_uncompressed']:.4f}", "", "")
    Console(width=130).print(table)
    for line in r["e_profile"]:
        print(line)


if __name__ == "__main__":
    main()
