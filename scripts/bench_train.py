"""Benchmark cogtrain's step against a bare training loop and against the peers' VAE + T5 every step.

    python scripts/bench_train.py [--arch tiny|2b|5b|5b-i2v|1.5-5b|1.5-5b-i2v] [--device cpu|cuda]
        [--mode lora|sft] [--rank 128] [--optimizer adamw|adamw8bit] [--base-weights bf16|fp8] [--compile]
        [--frames F --height H --width W] [--batch-size 1] [--steps 20] [--warmup 3] [--rounds 2]
        [--variants bare,cogtrain,baseline] [--no-gradient-checkpointing] [--offload-checkpoints]
        [--mixed-precision bf16] [--json PATH] [--work DIR] [--dry-run] [--sp-degree N]

Three variants on the same model, the same shapes and the same seed, each run in a fresh subprocess (so that
their memory peaks do not mix), round after round (so that a slow spell of a shared machine hits all of them):

  bare      the limit for a trainer that reads cached latents: inputs already on the device, the transformer's
            forward + backward + optimizer step, nothing else;
  cogtrain  cogtrain's own optimizer step, `train.trainer.Stepper.step`, set up as a run sets it up
            (`check_run` + `prepare`): batches from a real store through the prefetching loader, caption
            dropout, a fresh posterior sample, noise, rotary tables, gradient clipping, the lr schedule;
  baseline  what the peers' scripts do without a cache: VAE.encode of the pixel frames and T5 on the prompt
            every step, then the same training step (frames already decoded: a lower bound on their cost).

Step time is wall clock per optimizer step (CUDA synchronised): the table gives the median over every measured
step of every round (the ratio to the bare loop is taken on it), the mean, the minimum, and the process's CPU
seconds per step (steadier than wall time where other processes share the CPU). Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` (and reserved) over the whole subprocess, weights included; on the CPU the
growth of the process's anonymous peak RSS after the imports (library code pages left out, see `peak_memory`),
with glibc's mmap threshold fixed (``--malloc-mmap-threshold``) so that RSS follows live memory, and pyarrow's
allocator set up before the count in every variant, as the imports are.
Targets: cogtrain at most 1.05x the bare loop's median step time and 1.10x its peak memory; with ``--arch 5b
--device cuda``, under 18 GB reserved at the peers' setup (LoRA r128, 49x480x720, batch 1, gradient
checkpointing), where they need 20.7 GB (finetrainers' published CogVideoX memory figures).

``--arch tiny`` trains the tiny CogVideoX-5b of `shared.zoo` on a store encoded with cogprep. The other archs
(2b, 5b, 5b-i2v, 1.5-5b, 1.5-5b-i2v) build that release at full size from its published configs (transformer,
VAE, T5-XXL; cogvideox_5b.py) with random weights drawn directly on the device in the weights' dtype, and train
on a store of random latents (and, for I2V, image latents) written with the store API, so nothing is downloaded
and no VAE or T5 runs for cogtrain. ``--dry-run`` builds the model on the meta device, takes two steps there
(shapes only, nothing allocated) and prints the parameter counts, the memory the step would hold and the step's
model FLOPs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from bench_report import print_json
from cogtune.preprocess.cli import app as cogprep_app
from cogtune.preprocess.compute import encode_prompts
from cogtune.shared import store as S
from cogtune.shared.models import Model, open_model
from cogtune.shared.variants import get_variant
from cogtune.shared.video import write_video
from cogtune.shared.zoo import make_tiny_model
from cogtune.train.checks import check_run
from cogtune.train.compile import compile_blocks
from cogtune.train.config import TrainConfig
from cogtune.train.math import TrainBatch, ofs_tensor, padded_frame_count, rotary_embeddings, training_step
from cogtune.train.optimizer_sharding import OptimizerSharding, assign_owners
from cogtune.train.sequence_parallel import Layout, SequenceParallel, check_degree
from cogtune.train.trainer import (
    CUDA_ALLOCATOR,
    WEIGHT_DTYPES,
    build_transformer,
    make_accelerator,
    make_optimizer,
    prepare,
    release_accelerator,
    step_generator,
)
from cogtune.train.validation import tile_large_frames
from cogvideox_5b import (
    REAL_CONFIGS,
    MetaAdamW8bit,
    MetaMemory,
    RandomWeightsModel,
    flash_attention_on_meta,
    write_real_model,
)
from diffusers.utils import logging as diffusers_logging
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

VARIANTS = ("bare", "cogtrain", "baseline")
TARGET_TIME = 1.05
"""cogtrain's median step time over the bare loop's, at most."""
TARGET_MEMORY = 1.10
"""cogtrain's peak memory over the bare loop's, at most."""
TARGET_5B_GB = 18.0
"""cogtrain's peak reserved CUDA memory at the peers' setup, under (GB of 2^30 bytes, as torch counts)."""
PEERS_5B_GB = 20.7
"""finetrainers, CogVideoX-5b LoRA r128, 49x480x720, batch 1, gradient checkpointing: 20.7 GB (28.3 GB
after validation), as its documentation publishes it."""
PEERS_SETUP = {"arch": "5b", "mode": "lora", "rank": 128, "frames": 49, "height": 480, "width": 720,
               "batch_size": 1, "gradient_checkpointing": True, "offload_checkpoints": False}
"""The setup PEERS_5B_GB was measured at: the absolute comparison is only printed for it."""
DEFAULT_SHAPE = {"tiny": (49, 192, 288)}  # tiny: 0.2 s steps, fixed costs not magnified
DEFAULT_SHAPE.update({slug: (get_variant(slug).native_frames, get_variant(slug).native_height,
                             get_variant(slug).native_width) for slug in REAL_CONFIGS})  # each release's own
"""(frames, height, width) in pixels when not given."""
PROMPT = "a red circle moving left to right over a blue background"
"""The caption of every clip, and the prompt the baseline encodes each step."""
GB = 2**30
IMAGE_VARIANTS = 2
"""Noise-augmented image latents per I2V sample in the random store (cogprep's --image-noise-variants)."""
MODEL, STORE = "model", "store"
"""Folders of the work folder that the parent writes and every variant's process reads."""



def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    diffusers_logging.set_verbosity_error()  # e.g. the warning on casting a model built on the meta device
    if args.child:
        run_child(args)
        return
    if args.sp_degree != [1] and not args.dry_run:
        sys.exit("error: --sp-degree: with --dry-run only (a timed run at N > 1 needs a launch of N processes)")
    if args.device == "cuda" and not args.dry_run and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device is visible")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.dry_run:
            runs = [dry_run(argparse.Namespace(**{**vars(args), "sp_degree": n}), work) for n in args.sp_degree]
            counts = runs[0] if len(runs) == 1 else {"sp_degrees": runs}
            if len(runs) > 1:
                print_sp_table(runs)
            print_json(counts, args.json)
            return
        results = run_rounds(args, argv, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    print_json(results, args.json)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("tiny", *REAL_CONFIGS), default="tiny",
                        help="tiny: the tiny CogVideoX-5b of shared.zoo; 2b, 5b, 5b-i2v, 1.5-5b, 1.5-5b-i2v: that "
                             "release at its real size, random weights")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the step runs")
    parser.add_argument("--mode", choices=("lora", "sft"), default="lora", help="LoRA or full fine-tune (sft)")
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank (default 128)")
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw",
                        help="cogtrain's --optimizer (adamw8bit: bitsandbytes; on the meta device its state is "
                             "counted as bitsandbytes lays it out)")
    parser.add_argument("--base-weights", choices=("bf16", "fp8"), default="bf16",
                        help="cogtrain's --base-weights, LoRA only: fp8 keeps the frozen weights in float8 e4m3")
    parser.add_argument("--compile", action="store_true",
                        help="cogtrain's --compile: torch.compile each transformer block (every variant)")
    parser.add_argument("--frames", type=int, help="pixel frames, 8N+1 (default: the release's, tiny 49)")
    parser.add_argument("--height", type=int,
                        help="pixel height, a multiple of 16 (default: the release's, 480 or 768; tiny 192)")
    parser.add_argument("--width", type=int,
                        help="pixel width, a multiple of 16 (default: the release's, 720 or 1360; tiny 288)")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per step (default 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated variants to run, of {', '.join(VARIANTS)} (default all; the ratios "
                             f"and their verdicts need bare and cogtrain)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per variant and round (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps before them (default 3)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="times each variant runs, interleaved, each in a fresh process (default 2)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="recompute each block in the backward pass (default on)")
    parser.add_argument("--offload-checkpoints", action="store_true",
                        help="cogtrain's --offload-checkpoints, in every variant: checkpointed block inputs in host "
                             "memory")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="bf16",
                        help="autocast dtype, and the frozen weights' for LoRA (default bf16)")
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="cogtrain's caption dropout (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, data and LoRA (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads with --device cpu (default 1: steadier timings on a shared machine)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=2**20,
                        help="with --device cpu, every variant's glibc M_MMAP_THRESHOLD in bytes (default 1 MiB: "
                             "tensors above it are mapped and unmapped, so RSS follows live memory; 0 keeps "
                             "glibc's sliding threshold, under which a freed block's size moves later ones "
                             "to the heap and RSS keeps what the heap has held)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--work", type=Path, help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model on the meta device, run one step there, print the counts; no timing")
    parser.add_argument("--sp-degree", type=lambda text: [int(n) for n in text.split(",")], default=[1],
                        help="with --dry-run: count one rank of a sequence-parallel group of N (cogtrain "
                             "--sp-degree N), the one holding the last chunk; a list (1,2,4,8) counts each and "
                             "prints a table against the first (default 1)")
    parser.add_argument("--shard-optimizer", action="store_true",
                        help="with --dry-run: cogtrain --shard-optimizer over the N processes of --sp-degree N, "
                             "counted for the process that owns the most (default: DDP's whole gradients)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    frames, height, width = DEFAULT_SHAPE[args.arch]
    args.frames, args.height, args.width = args.frames or frames, args.height or height, args.width or width
    if (args.frames - 1) % 8 or args.height % 16 or args.width % 16:
        parser.error(f"{args.frames}x{args.height}x{args.width}: frames must be 8N+1, height and width multiples of 16")
    if min(args.steps, args.rounds, args.batch_size, args.rank, args.threads) < 1 or args.warmup < 0:
        parser.error("--steps, --rounds, --batch-size, --rank and --threads must be at least 1, --warmup at least 0")
    args.variants = tuple(v for v in args.variants.split(",") if v)
    if not args.variants or set(args.variants) - set(VARIANTS):
        parser.error(f"--variants {','.join(args.variants)}: name some of {', '.join(VARIANTS)}")
    if args.base_weights == "fp8" and args.mode != "lora":
        parser.error("--base-weights fp8: LoRA only")
    return args


# ---------------------------------------------------------------------------------------------------------
# the model: a tiny one with weights, or CogVideoX-5b's configs with random weights drawn on the device
# (cogvideox_5b.py)


def bench_model(args: argparse.Namespace, path: Path, device: str) -> Model:
    """The model every variant loads: the tiny folder's own weights, or 5b's random ones drawn on `device`."""
    model = open_model(path)
    if args.arch == "tiny" and device != "meta":
        return model
    return RandomWeightsModel(path=model.path, source=model.source, device=device, seed=args.seed)


# ---------------------------------------------------------------------------------------------------------
# the store: cogprep's encode of synthetic clips (tiny), or random latents of the right shape (5b)


def latent_shape(args: argparse.Namespace) -> tuple[int, int, int]:
    """(frames, height, width) of the latents: the VAE compresses 4x in time (8N+1 -> 2N+1), 8x in space."""
    return (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8


def samples_in_store(args: argparse.Namespace) -> int:
    """Two full batches: the loader moves on to another batch, and no partial batch changes the shape."""
    return 2 * args.batch_size


def encode_tiny_store(args: argparse.Namespace, model: Path, store: Path) -> None:
    """`cogprep encode` (the CLI, in this process) of synthetic clips of exactly the benchmark's size."""
    dataset = store.with_name("clips")
    count = samples_in_store(args)
    y, x = np.mgrid[0 : args.height, 0 : args.width]
    for i in range(count):
        gradient = np.stack([x / args.width, y / args.height, np.full(x.shape, i / count)], -1) * 200
        video = np.repeat(gradient[None], args.frames, 0)
        side = args.height // 4
        for t in range(args.frames):  # a square crossing the frame
            left = (args.width - side) * t // (args.frames - 1)
            video[t, args.height // 3 : args.height // 3 + side, left : left + side] = (240, 60, 30)
        write_video(dataset / "videos" / f"clip_{i}.mp4", video.astype(np.uint8), fps=8)
    (dataset / "videos.txt").write_text("".join(f"videos/clip_{i}.mp4\n" for i in range(count)))
    (dataset / "prompts.txt").write_text(f"{PROMPT}\n" * count)
    argv = ["encode", dataset, "--model", model, "--out", store, "--device", "cpu", "--workers", "0",
            "--resolution", f"{args.frames}x{args.height}x{args.width}", "--no-progress"]
    result = CliRunner().invoke(cogprep_app, [str(a) for a in argv])
    if result.exit_code != 0:
        raise RuntimeError(f"cogprep encode failed (exit {result.exit_code}): {result.output}")


def write_random_store(args: argparse.Namespace, model: Path, store: Path) -> None:
    """A store of random bfloat16 posteriors and embeddings of the model's real shapes, written with the store
    API and recorded as made with `model`, so cogtrain's start-up checks accept it as they would an encode."""
    opened = open_model(model)
    transformer = opened.config("transformer")
    channels, text = transformer["out_channels"], (transformer["max_text_seq_length"], transformer["text_embed_dim"])
    bucket = f"{args.frames}x{args.height}x{args.width}"
    generator = torch.Generator().manual_seed(args.seed)
    videos, texts = S.ShardWriter(store, bucket, prefix="bench"), S.ShardWriter(store, S.TEXT_BUCKET, prefix="bench")
    image_to_video = opened.variant.task == "i2v"
    rows = []
    for i in range(samples_in_store(args)):
        shape = (channels, *latent_shape(args))
        latent = {name: torch.randn(shape, generator=generator).bfloat16() for name in (S.MEAN, S.LOGVAR)}
        embedding = torch.randn(text, generator=generator).bfloat16()
        video_key, text_key = f"{i:016x}{0:016x}", f"{i:016x}{1:016x}"
        members = {S.LATENT: S.tensors_to_bytes(latent), S.META: b"{}"}
        if image_to_video:  # the first-frame latent as cogprep caches it: clean, and IMAGE_VARIANTS noisy encodings
            image_shape = (channels, 1, *latent_shape(args)[1:])
            members[S.IMAGE] = S.tensors_to_bytes({
                S.CLEAN: torch.randn(image_shape, generator=generator).bfloat16(),
                S.NOISY: torch.randn((IMAGE_VARIANTS, *image_shape), generator=generator).bfloat16(),
                S.SIGMA: torch.full((IMAGE_VARIANTS,), 0.05),
            })
        video = videos.add(video_key, members)
        caption = texts.add(text_key, {S.TEXT: S.tensors_to_bytes({S.EMBEDDING: embedding}), S.META: b"{}"})
        rows.append({
            "key": f"{i:032x}", "source": f"random/{i}", "kind": "video", "bucket": bucket, "frames": args.frames,
            "height": args.height, "width": args.width, "caption": PROMPT, "clip_start": 0, "clip_step": 1.0,
            "source_size": 0, "source_mtime_ns": 0, "source_hash": "random", "video_key": video_key,
            "text_key": text_key, "shard": video[S.LATENT].shard, "latent_offset": video[S.LATENT].offset,
            "latent_size": video[S.LATENT].size,
            "image_offset": video[S.IMAGE].offset if image_to_video else -1,
            "image_size": video[S.IMAGE].size if image_to_video else 0,
            "text_shard": caption[S.TEXT].shard, "text_offset": caption[S.TEXT].offset,
            "text_size": caption[S.TEXT].size, "text_tokens": text[0],
        })
    videos.close()
    texts.close()
    S.write_index(store, rows)
    S.write_extras(store, {"empty_embedding": torch.randn(text, generator=generator).bfloat16()})
    S.Manifest(
        model={"source": str(model), "variant": opened.variant.name,
               "configs": opened.config_fingerprint(("vae", "text_encoder"))},
        settings={"noise_variants": IMAGE_VARIANTS if image_to_video else 0},
        dataset={},  # no dataset path: cogtrain has nothing to check for staleness
        buckets=[{"name": bucket, "frames": args.frames, "height": args.height, "width": args.width,
                  "batch_size": args.batch_size, "samples": len(rows)}],
    ).save(store)


def make_model_folder(args: argparse.Namespace, work: Path) -> Path:
    """work/model: the tiny CogVideoX-5b with its weights, or the release's configs (--arch)."""
    if args.arch == "tiny":
        return make_tiny_model("5b", work / MODEL, seed=args.seed)
    return write_real_model(work / MODEL, args.arch)


def train_config(args: argparse.Namespace, model: Path, store: Path, out: Path) -> TrainConfig:
    """The cogtrain run every variant mirrors (the bare loop and the baseline take its model settings)."""
    return TrainConfig(
        store=store, model=str(model), out=out, mode=args.mode, rank=args.rank, batch_size=args.batch_size,
        max_steps=args.warmup + args.steps, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, offload_checkpoints=args.offload_checkpoints,
        caption_dropout=args.caption_dropout, seed=args.seed, optimizer=args.optimizer,
        base_weights=args.base_weights, compile=args.compile, shard_optimizer=args.shard_optimizer,
        report_to="none", progress=False, device=args.device,
    )


# ---------------------------------------------------------------------------------------------------------
# the parent: assets once, then every variant in its own process, round after round


def run_rounds(args: argparse.Namespace, argv: list[str], work: Path) -> dict[str, Any]:
    started = time.time()
    model = make_model_folder(args, work)
    write_store = encode_tiny_store if args.arch == "tiny" else write_random_store
    write_store(args, model, work / STORE)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.variants}
    for round_number in range(args.rounds):
        for name in args.variants:
            result = run_variant(args, argv, name, work, round_number)
            runs[name].append(result)
            done = f"{statistics.median(result['step_s']):.4f} s/step" if "step_s" in result else result["skipped"]
            print(f"round {round_number + 1}/{args.rounds} {name}: {done}", file=sys.stderr, flush=True)
    return summarize(args, runs, time.time() - started)


def run_variant(args: argparse.Namespace, argv: list[str], name: str, work: Path,
                round_number: int) -> dict[str, Any]:
    """One variant in a fresh Python process; its result, or why it has none."""
    result = work / f"{name}-{round_number}.json"
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--work", str(work), "--child", name,
               "--result", str(result)]
    environment = dict(os.environ)
    if args.device == "cpu" and args.malloc_mmap_threshold:
        environment["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    if args.device == "cuda":  # every variant with the CUDA allocator settings a cogtrain run uses
        environment.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOCATOR)
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    if done.returncode != 0 or not result.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"skipped": f"exit {done.returncode}: {tail[0]}"}
    return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------------------------
# the child: one variant, measured


def run_child(args: argparse.Namespace) -> None:
    """Build one variant, take --warmup then --steps steps, write times and peak memory to --result."""
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    # pyarrow sets up its allocator (mimalloc) on first use: 4.4 MB for the 2-row index here, allocator state,
    # not data. Library start-up like the imports: done in every variant alike before the reset, not counted
    S.read_index(args.work / STORE, ("bucket",))
    host_start = reset_host_peak()  # after every import: code loaded by all variants alike is not counted
    config = train_config(args, args.work / MODEL, args.work / STORE, args.work / "runs" / args.result.stem)
    try:
        step, close, data_waits = SETUPS[args.child](args, config, device)
        try:
            times, cpu_times, loss = measure(step, args.warmup, args.steps, device)
        finally:
            close()
    except torch.OutOfMemoryError as e:
        result = {"skipped": f"out of memory: {str(e).splitlines()[0]}"}
    except NotImplementedError as e:
        result = {"skipped": str(e)}
    else:
        result = {"step_s": times, "cpu_s": cpu_times, "final_loss": loss,
                  "memory": peak_memory(device, host_start)}
        if data_waits:
            result["data_wait_s"] = data_waits[args.warmup:]
    args.result.write_text(json.dumps(result))


def measure(step: Callable[[int], Any], warmup: int, steps: int,
            device: torch.device) -> tuple[list[float], list[float], float]:
    """Wall seconds of each step after the warm-up ones (the device synchronised around each), the process's
    CPU seconds of each (all its threads: steadier than wall time where other processes share the CPU), and
    the last loss."""
    times, cpu_times, loss = [], [], None
    for number in range(1, warmup + steps + 1):
        synchronize(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        loss = step(number)
        synchronize(device)
        if number > warmup:
            times.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu_started)
    return times, cpu_times, float(loss)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_host_peak() -> dict[str, int]:
    """Reset the process's peak RSS to its current RSS (Linux clear_refs 5); returns /proc/self/status now."""
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status()


def proc_status() -> dict[str, int]:
    """The memory fields of /proc/self/status, in bytes (VmRSS, VmHWM, RssAnon, RssFile, RssShmem, ...)."""
    fields = (line.split() for line in Path("/proc/self/status").read_text().splitlines())
    return {f[0].rstrip(":"): int(f[1]) * 1024 for f in fields if len(f) == 3 and f[2] == "kB"}


def peak_memory(device: torch.device, start: dict[str, int]) -> dict[str, int]:
    """Peak bytes since `start`. Host: the growth of peak RSS, and of its anonymous part: peak RSS less the
    file-backed and shared pages held at the end (library code a variant touched for the first time is not
    training memory; file pages only accumulate, so this errs low by at most those first touched after the
    peak). CUDA: the allocator's peaks over the whole process, weights included."""
    end = proc_status()
    memory = {
        "host_peak_growth": end["VmHWM"] - start["VmRSS"],
        "host_peak_anon_growth": end["VmHWM"] - end["RssFile"] - end["RssShmem"] - start["RssAnon"],
    }
    if device.type == "cuda":
        memory["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
        memory["cuda_max_reserved"] = torch.cuda.max_memory_reserved(device)
    return memory


def transformer_and_optimizer(config: TrainConfig, model: Model, device: torch.device):
    """The transformer exactly as cogtrain builds it (LoRA or not, dtypes, checkpointing, seed) on `device`,
    its forward autocast as accelerate's mixed precision does it, and cogtrain's optimizer over it."""
    set_seed(config.seed)
    transformer = build_transformer(config, model).to(device)
    if config.compile:  # as cogtrain's prepare compiles
        compile_blocks(transformer)
    if config.mixed_precision != "no":
        transformer.forward = torch.autocast(device.type, dtype=WEIGHT_DTYPES[config.mixed_precision])(
            transformer.forward)
    trained = [p for p in transformer.parameters() if p.requires_grad]
    return transformer, trained, make_optimizer(config, trained)


def embed_dtype(config: TrainConfig) -> torch.dtype:
    """What cogtrain feeds the transformer (its `prepare`): the frozen weights' dtype for LoRA, else float32."""
    return WEIGHT_DTYPES[config.mixed_precision] if config.mode == "lora" else torch.float32


def setup_bare(args: argparse.Namespace, config: TrainConfig, device: torch.device):
    """The bare loop: fixed inputs already on the device, forward + MSE + backward + optimizer step."""
    model = bench_model(args, args.work / MODEL, str(device))
    transformer, _, optimizer = transformer_and_optimizer(config, model, device)
    frames, height, width = latent_shape(args)
    tc = transformer.config
    frames = padded_frame_count(frames, tc.get("patch_size_t"))  # 1.5 pads to whole temporal patches
    generator = torch.Generator().manual_seed(config.seed)
    latents = (args.batch_size, frames, tc.out_channels, height, width)
    # I2V takes the image latent concatenated on the channels: in_channels is twice out_channels
    hidden = torch.randn((*latents[:2], tc.in_channels, height, width), generator=generator)
    hidden = hidden.to(device, embed_dtype(config))
    ofs = ofs_tensor(tc, args.batch_size, device, embed_dtype(config))
    text = torch.randn((args.batch_size, tc.max_text_seq_length, tc.text_embed_dim), generator=generator)
    text = text.to(device, embed_dtype(config))
    target = torch.randn(latents, generator=generator).to(device)
    timesteps = torch.randint(0, model.load_scheduler().config.num_train_timesteps, (args.batch_size,),
                              generator=generator).to(device)
    rotary = rotary_embeddings(tc, height, width, frames, device)

    def step(_: int) -> torch.Tensor:
        prediction = transformer(hidden_states=hidden, encoder_hidden_states=text, timestep=timesteps,
                                 ofs=ofs, image_rotary_emb=rotary, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, lambda: None, []


def setup_cogtrain(args: argparse.Namespace, config: TrainConfig, device: torch.device):
    """cogtrain's step as a run takes it: start-up checks, accelerate, `prepare`, the store loader."""
    inputs = check_run(config)
    inputs = replace(inputs, model=bench_model(args, inputs.model.path, str(device)))
    accelerator = make_accelerator(config)
    stepper, loader, _ = prepare(config, inputs, accelerator)
    batches = iter(loader)

    def close() -> None:
        batches.close()
        release_accelerator(accelerator)

    data_waits: list[float] = []

    def step(number: int) -> float:
        metrics, _, _ = stepper.step(number, batches)
        data_waits.append(metrics["data_wait"])
        return metrics["loss"]

    return step, close, data_waits


def setup_baseline(args: argparse.Namespace, config: TrainConfig, device: torch.device):
    """The peers' step without a cache: VAE.encode of the clip (sliced, and for 5b tiled, as their scripts
    run it) and T5 on its prompt, then the training step (the same math as cogtrain's,
    `training_step`), clipping and the optimizer step.

    The VAE and T5 run as cogprep runs them: bfloat16 on CUDA, float32 on the CPU. Text-to-video only: an
    image-to-video baseline would also encode the first frame, which this does not model.
    """
    if get_variant(args.arch if args.arch != "tiny" else "5b").task == "i2v":
        raise NotImplementedError("the baseline is text-to-video only")
    model = bench_model(args, args.work / MODEL, str(device))
    transformer, trained, optimizer = transformer_and_optimizer(config, model, device)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = model.load_vae(compute).to(device)
    # as the peers' CogVideoX scripts are run (--enable_slicing --enable_tiling), so that the full-size encode
    # fits; the tiny VAE's tiles (a quarter of 64x96) are too small to tile correctly, so it stays untiled
    vae.enable_slicing()
    if args.arch == "5b":
        tile_large_frames(vae, args.height, args.width)
    text_encoder, tokenizer = model.load_text_encoder(compute).to(device), model.load_tokenizer()
    scheduler, vae_config = model.load_scheduler(), model.config("vae")
    generator = torch.Generator().manual_seed(config.seed)
    pixels = torch.rand((args.batch_size, 3, args.frames, args.height, args.width), generator=generator) * 2 - 1
    pixels = pixels.to(device, compute)

    def step(number: int) -> torch.Tensor:
        with torch.no_grad():
            posterior = vae.encode(pixels).latent_dist
        embeddings, _ = encode_prompts(tokenizer, text_encoder, [PROMPT] * args.batch_size,
                                       transformer.config.max_text_seq_length, device)
        batch = TrainBatch(latent_mean=posterior.mean, latent_logvar=posterior.logvar,
                           prompt_embeds=torch.stack(embeddings).to(device, embed_dtype(config)))
        loss = training_step(transformer, scheduler, batch, vae_scaling_factor=vae_config["scaling_factor"],
                             invert_scale_latents=bool(vae_config.get("invert_scale_latents", False)),
                             generator=step_generator(config.seed, 0, number, device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, lambda: None, []


SETUPS = {"bare": setup_bare, "cogtrain": setup_cogtrain, "baseline": setup_baseline}
"""Each builds its variant in this process; returns (step(number) -> loss, close(), the seconds each step
waited for its data, which cogtrain's step reports)."""


# ---------------------------------------------------------------------------------------------------------
# --dry-run


def dry_run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build the model on the meta device as cogtrain would (LoRA, dtypes, checkpointing, offloading) and take
    two optimizer steps at the benchmark's shape there: the configs and shapes are checked, nothing is
    allocated, and `MetaMemory` counts what the device would hold."""
    folder = make_model_folder(args, work)
    model = bench_model(args, folder, "meta")
    config = train_config(args, folder, work / STORE, work / "run")
    # --base-weights fp8 runs here as on CUDA: diffusers' layerwise casting stores the frozen layers in float8 on
    # the meta device too (1 byte an element), and the upcast copy of each layer is counted while its forward runs
    transformer = build_transformer(config, model)
    check_degree(args.sp_degree, transformer.config.num_attention_heads, args.sp_degree, model.variant.name)
    # the last rank of the group: on the meta device its exchanges make the buffers it would receive, no collective
    sequence = SequenceParallel(degree=args.sp_degree, rank=args.sp_degree - 1, dp_rank=0, dp_degree=1)
    sequence.attach(transformer)
    vae, text_encoder = model.load_vae(torch.bfloat16), model.load_text_encoder(torch.bfloat16)
    trained = [p for p in transformer.parameters() if p.requires_grad]
    # bitsandbytes' kernels need CUDA: its 8-bit state is made as bitsandbytes makes it, and counted
    optimizer = MetaAdamW8bit(trained) if config.optimizer == "adamw8bit" else make_optimizer(config, trained)
    frames, height, width = latent_shape(args)
    tc = transformer.config
    image_to_video = model.variant.task == "i2v"
    latents = (args.batch_size, tc.out_channels, frames, height, width)
    text = (args.batch_size, tc.max_text_seq_length, tc.text_embed_dim)
    vae_config = model.config("vae")

    def meta_batch() -> TrainBatch:
        return TrainBatch(latent_mean=torch.empty(latents, device="meta", dtype=torch.bfloat16),
                          latent_logvar=torch.empty(latents, device="meta", dtype=torch.bfloat16),
                          prompt_embeds=torch.empty(text, device="meta", dtype=embed_dtype(config)),
                          image_latents=torch.empty((*latents[:2], 1, *latents[3:]), device="meta",
                                                    dtype=torch.bfloat16) if image_to_video else None)

    def forward(batch: TrainBatch) -> torch.Tensor:
        return training_step(transformer, model.load_scheduler(), batch,
                             vae_scaling_factor=vae_config["scaling_factor"],
                             invert_scale_latents=bool(vae_config.get("invert_scale_latents", False)))

    sharding = heaviest_shard(optimizer, args.sp_degree) if args.shard_optimizer else None
    # a launch of N > 1 processes without --shard-optimizer is DDP's: its gradient buckets are held from before
    # the first step
    buckets = [ddp_gradient_buckets(trained)] if args.sp_degree > 1 and sharding is None else []
    memory = MetaMemory([*transformer.parameters(), *transformer.buffers(), *buckets])
    with memory, flash_attention_on_meta():
        for _ in range(2):  # the second step holds the optimizer state the first one made
            batch = meta_batch()
            before_forward = memory.live
            with sequence.sharding():
                loss = forward(batch)
                kept_for_backward = memory.live - before_forward
                loss.backward()
                if sharding is not None:
                    sharding.finish_backward()
            with_grad = sum(p.numel() for p in trained if p.grad is not None)
            optimizer.step()
            # DDP's bucket views stay: set to None, they are views of the buckets again after the next backward
            optimizer.zero_grad(set_to_none=not buckets)
            del batch, loss
    optimizer_bytes = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                          for t in state.values() if isinstance(t, torch.Tensor))
    # the model FLOPs of one step: forward and backward without checkpointing's recompute (what the step needs,
    # not what checkpointing makes the device do), matmuls and attention as torch's FlopCounterMode counts them
    if config.gradient_checkpointing:
        transformer.disable_gradient_checkpointing()
    flops = FlopCounterMode(display=False)
    with flops, flash_attention_on_meta(), sequence.sharding():
        forward(meta_batch()).backward()
    trained_bytes = sum(p.numel() * p.element_size() for p in trained)
    gradient_bytes = trained_bytes if sharding is None else sharding.owned_bytes
    weights_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters())
    patch_t = tc.get("patch_size_t") or 1
    video_tokens = padded_frame_count(frames, tc.get("patch_size_t")) // patch_t * (height // tc.patch_size) * (
        width // tc.patch_size)
    return {
        "arch": args.arch,
        "variant": model.variant.name,
        "mode": args.mode,
        "optimizer": args.optimizer,
        "base_weights": args.base_weights,
        "compile": args.compile,
        "shape": f"{args.frames}x{args.height}x{args.width}",
        "batch_size": args.batch_size,
        "gradient_checkpointing": args.gradient_checkpointing,
        "offload_checkpoints": args.offload_checkpoints,
        "latents": list(latents),
        "tokens": video_tokens + tc.max_text_seq_length,
        "sp_degree": args.sp_degree,  # one degree here: main hands each of a list to its own dry_run
        "shard_optimizer": args.shard_optimizer,
        "tokens_per_rank": Layout(tc.max_text_seq_length, video_tokens, args.sp_degree, args.sp_degree - 1).chunk,
        "model_flops_per_step": flops.get_total_flops(),
        "weights_bytes": weights_bytes,  # exact, for the tiny model whose GB figures round to 0
        "optimizer_state_bytes": optimizer_bytes,
        "gradient_bytes": gradient_bytes,  # held after the backward: every trained weight's, or the owned ones
        "transformer_parameters": sum(p.numel() for n, p in transformer.named_parameters() if "lora_" not in n),
        "trained_parameters": sum(p.numel() for p in trained),
        "parameters_with_grad_after_backward": with_grad,
        "vae_parameters": sum(p.numel() for p in vae.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
        "static_memory_gb": {
            "weights_frozen_and_trained": round(weights_bytes / GB, 3),
            "gradients": round(gradient_bytes / GB, 3),
            "optimizer_states": round(optimizer_bytes / GB, 3),
            "total_before_activations": round((weights_bytes + gradient_bytes + optimizer_bytes) / GB, 3),
        },
        "meta_device_memory_gb": {
            "kept_by_the_forward_for_the_backward": round(kept_for_backward / GB, 3),
            "peak": round(memory.peak / GB, 3),
            "what_it_is": "every tensor the step's ops make, counted on the meta device with flash attention, "
                          "and at --sp-degree above 1 DDP's gradient buckets, held all along (the gradients are "
                          "views of them), or with --shard-optimizer the owned gradients and each other one until "
                          "it is reduced; not counted: autocast (there is none on the meta device: its float32 "
                          "norm outputs are in the weights' dtype here, and a full fine-tune's activations are float32 where "
                          "autocast would make most bfloat16, and its bfloat16 weight copies are absent), the CUDA "
                          "allocator's rounding and caching (reserved is higher), the CUDA context",
        },
    }


def heaviest_shard(optimizer: torch.optim.Optimizer, world: int) -> OptimizerSharding:
    """cogtrain's sharding as the process of `world` that owns the most trained bytes sees it."""
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    owners = assign_owners([p.numel() for p in trained], world)
    owned = [sum(p.numel() for p, owner in zip(trained, owners) if owner == rank) for rank in range(world)]
    return OptimizerSharding(optimizer, owned.index(max(owned)), world)


def ddp_gradient_buckets(trained: list[torch.nn.Parameter]) -> torch.Tensor:
    """What DDP holds on each process of a launch (N > 1): one buffer for the trained weights' gradients, made
    as it wraps the model and kept for the run; cogtrain's gradients are views of it (`gradient_as_bucket_view`,
    train.trainer.make_accelerator). Each gradient is made a view of it here, as DDP makes it after a backward."""
    buckets = torch.empty(sum(p.numel() for p in trained), device="meta", dtype=trained[0].dtype)
    offset = 0
    for parameter in trained:
        parameter.grad = buckets[offset:offset + parameter.numel()].view_as(parameter)
        offset += parameter.numel()
    return buckets


# ---------------------------------------------------------------------------------------------------------
# results


def print_sp_table(runs: list[dict[str, Any]]) -> None:
    """Per-rank figures of each --sp-degree, against the first degree's (the baseline of the same run)."""
    base = runs[0]["meta_device_memory_gb"]
    sharded = ", gradients and optimizer state sharded" if runs[0]["shard_optimizer"] else ""
    print(f"{runs[0]['variant']} {runs[0]['mode']} {runs[0]['shape']}, {runs[0]['tokens']} tokens{sharded}, per rank "
          f"(meta-device count, GiB):")
    print(f"{'SP':>3} {'tokens':>7} {'kept for backward':>18} {'x':>6} {'grads':>6} {'optim':>6} {'peak':>8} {'x':>6}"
          f" {'TFLOP/step':>11}")
    for run in runs:
        memory, static = run["meta_device_memory_gb"], run["static_memory_gb"]
        print(f"{run['sp_degree']:>3} {run['tokens_per_rank']:>7} {memory['kept_by_the_forward_for_the_backward']:>18.3f}"
              f" {memory['kept_by_the_forward_for_the_backward'] / base['kept_by_the_forward_for_the_backward']:>6.3f}"
              f" {static['gradients']:>6.2f} {static['optimizer_states']:>6.2f}"
              f" {memory['peak']:>8.3f} {memory['peak'] / base['peak']:>6.3f}"
              f" {run['model_flops_per_step'] / 1e12:>11.1f}")


def summarize(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], seconds: float) -> dict[str, Any]:
    """Per variant: step-time statistics over every measured step of every round, the median peak memory,
    ratios to the bare loop, and the verdicts against the targets."""
    memory_key = "cuda_max_allocated" if args.device == "cuda" else "host_peak_anon_growth"
    variants: dict[str, dict[str, Any]] = {}
    for name, results in runs.items():
        measured = [r for r in results if "step_s" in r]
        if not measured:
            variants[name] = {"skipped": results[0]["skipped"]}
            continue
        times = [t for r in measured for t in r["step_s"]]
        memory = {key: int(statistics.median(r["memory"][key] for r in measured)) for key in measured[0]["memory"]}
        variants[name] = {
            "median_s": statistics.median(times),
            "mean_s": statistics.mean(times),
            "min_s": min(times),
            "median_cpu_s": statistics.median(t for r in measured for t in r["cpu_s"]),
            "round_medians_s": [statistics.median(r["step_s"]) for r in measured],
            "steps": len(times),
            "peak_memory_bytes": memory,
            "final_losses": [r["final_loss"] for r in measured],
        }
        waits = [t for r in measured for t in r.get("data_wait_s", [])]
        if waits:  # cogtrain: how long its steps waited for the loader
            variants[name]["data_wait_median_s"] = statistics.median(waits)
            variants[name]["data_wait_max_s"] = max(waits)
        if len(measured) < len(results):
            variants[name]["rounds_failed"] = [r["skipped"] for r in results if "skipped" in r]
    bare = variants.get("bare", {"skipped": "not run (--variants)"})
    for name, v in variants.items():
        if "skipped" not in v and "skipped" not in bare:
            v["time_ratio"] = v["median_s"] / bare["median_s"]
            v["cpu_time_ratio"] = v["median_cpu_s"] / bare["median_cpu_s"]
            v["memory_ratio"] = v["peak_memory_bytes"][memory_key] / bare["peak_memory_bytes"][memory_key]
    cogtrain = variants.get("cogtrain", {"skipped": "not run (--variants)"})
    verdicts = {}
    if "time_ratio" in cogtrain:
        verdicts["time"] = cogtrain["time_ratio"] <= TARGET_TIME
        verdicts["memory"] = cogtrain["memory_ratio"] <= TARGET_MEMORY
    if args.arch == "5b" and args.device == "cuda" and "skipped" not in cogtrain:
        verdicts["under_18_gb"] = cogtrain["peak_memory_bytes"]["cuda_max_reserved"] / GB < TARGET_5B_GB
    return {
        "settings": {
            **{key: getattr(args, key) for key in ("arch", "device", "mode", "rank", "optimizer", "base_weights",
                                                   "compile", "frames", "height", "width", "batch_size",
                                                   "gradient_checkpointing", "offload_checkpoints",
                                                   "mixed_precision", "caption_dropout", "seed", "steps", "warmup",
                                                   "rounds", "variants")},
            "latents": list(latent_shape(args)),
            "threads": args.threads if args.device == "cpu" else None,
            "malloc_mmap_threshold": args.malloc_mmap_threshold if args.device == "cpu" else None,
            "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOCATOR)
            if args.device == "cuda" else None,
            "cogtrain_prefetch": train_config(args, Path(), Path(), Path()).prefetch,
        },
        "machine": {
            "torch": torch.__version__, "python": platform.python_version(), "cpu_cores": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        },
        "memory_measure": memory_key,
        "variants": variants,
        "targets": {"time_ratio": TARGET_TIME, "memory_ratio": TARGET_MEMORY, "cuda_5b_gb": TARGET_5B_GB,
                    "peers_5b_gb": PEERS_5B_GB},
        "pass": verdicts,
        "peers_setup": all(getattr(args, key) == value for key, value in PEERS_SETUP.items()),
        "bench_seconds": round(seconds, 1),
    }


def print_table(results: dict[str, Any]) -> None:
    s, key = results["settings"], results["memory_measure"]
    model = ("tiny CogVideoX-5b (shared.zoo)" if s["arch"] == "tiny"
             else f"{get_variant(s['arch']).name} (random weights)")
    adapter = (f"LoRA r{s['rank']}, {s['base_weights']} base weights" if s["mode"] == "lora"
               else f"full fine-tune, {s['optimizer']}")
    adapter += ", compiled blocks" if s["compile"] else ""
    threads = f" ({s['threads']} torch thread{'s' if s['threads'] > 1 else ''})" if s["threads"] else ""
    print(f"cogtrain step benchmark: {model}, {adapter}, {s['frames']}x{s['height']}x{s['width']} "
          f"(latents {'x'.join(map(str, s['latents']))}), batch {s['batch_size']}, {s['mixed_precision']}, "
          f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}"
          f"{' (inputs offloaded to the host)' if s['offload_checkpoints'] else ''}, {s['device']}{threads}; "
          f"{s['steps']} steps x {s['rounds']} rounds after {s['warmup']} warm-up; "
          f"load average {results['machine']['load_average_1min']} on {results['machine']['cpu_cores']} cores")
    memory = "CUDA max allocated" if key == "cuda_max_allocated" else "peak anon RSS growth"
    print(f"{'variant':<9} {'median s':>9} {'mean s':>8} {'min s':>8} {'x bare':>7} {'CPU s':>8} {'x bare':>7} "
          f"{memory:>21} {'x bare':>7}")
    for name, v in results["variants"].items():
        if "skipped" in v:
            print(f"{name:<9} skipped: {v['skipped']}")
            continue
        time_ratio, cpu_ratio, memory_ratio = (v.get(k, math.nan) for k in ("time_ratio", "cpu_time_ratio",
                                                                            "memory_ratio"))
        print(f"{name:<9} {v['median_s']:>9.4f} {v['mean_s']:>8.4f} {v['min_s']:>8.4f} {time_ratio:>7.3f} "
              f"{v['median_cpu_s']:>8.4f} {cpu_ratio:>7.3f} {human(v['peak_memory_bytes'][key]):>21} "
              f"{memory_ratio:>7.3f}")
    verdicts, cogtrain = results["pass"], results["variants"].get("cogtrain", {})
    if "time" in verdicts:
        print(f"cogtrain vs bare: median step time {cogtrain['time_ratio']:.3f}x (target <= {TARGET_TIME}): "
              f"{'PASS' if verdicts['time'] else 'FAIL'}; peak memory {cogtrain['memory_ratio']:.3f}x "
              f"(target <= {TARGET_MEMORY}): {'PASS' if verdicts['memory'] else 'FAIL'}")
    if "data_wait_median_s" in cogtrain:
        print(f"cogtrain waited for its loader (prefetch {s['cogtrain_prefetch']}): median "
              f"{cogtrain['data_wait_median_s'] * 1e3:.2f} ms, at most {cogtrain['data_wait_max_s'] * 1e3:.2f} ms a step")
    if "under_18_gb" in verdicts:
        peaks = cogtrain["peak_memory_bytes"]
        line = (f"cogtrain 5b: {peaks['cuda_max_allocated'] / GB:.2f} GB allocated, "
                f"{peaks['cuda_max_reserved'] / GB:.2f} GB reserved (target < {TARGET_5B_GB} GB reserved): "
                f"{'PASS' if verdicts['under_18_gb'] else 'FAIL'}")
        if results["peers_setup"]:
            line += f"; the peers need {PEERS_5B_GB} GB at this setup (finetrainers' published figure)"
        print(line)


def human(n: float) -> str:
    return f"{n / GB:.2f} GB" if abs(n) >= GB else f"{n / 2**20:.1f} MB"


if __name__ == "__main__":
    main()
