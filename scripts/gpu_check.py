"""The GPU check: what a machine with a GPU should measure first, in one command and one table (run it through
scripts/gpu_check.sh, which installs what a bare GPU image lacks).

    python scripts/gpu_check.py [--device cuda|cpu] [--arch real|tiny] [--budget-s 480] [--warmup 3] [--steps 5]
        [--out DIR] [--skip-tests] [--skip-fsdp]

For each configuration of the real-size memory issue (CogVideoX-5b LoRA r128 at 49x480x720 plain, offloaded,
fp8, fp8 + offloaded; CogVideoX1.5-5B-I2V LoRA r128 at 81x768x1360 the same four; CogVideoX-5b full fine-tune
with 8-bit AdamW), `bench_train.py` runs cogtrain's own step (`--variants cogtrain`, one round, --warmup then
--steps steps) in a fresh process, and the table gives peak allocated and reserved GiB, the median seconds per
step, and the model-FLOPs utilisation against the device's bf16 peak. The model FLOPs of each step (forward and
backward, checkpointing's recompute left out) and the meta-device count beside them come from `bench_train.py
--dry-run`, run on the CPU cores while the GPU measures. Then cogprep's models at real size (`bench_prep.py
real-size`: the VAE encoding a 49x480x720 and an 81x768x1360 clip, T5-XXL a 226-token caption, peak memory and
clips per minute; PREP_RESERVE_S of the budget is kept for it), the activation-offload tests (pinned host memory
on CUDA) and a 1-process FSDP run of the tiny model whose exported transformer is loaded into the diffusers
pipeline and run.

Everything stays inside --budget-s: a configuration whose estimated time (its FLOPs at a third of the peak, plus
start-up) no longer fits is skipped and says so, and each runs under the time left. `--device cpu --arch tiny`
runs the same code end to end with tiny shapes (the suite does, so that GPU time goes to measuring).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
GIB = 2**30
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
"""Dense bf16 peak by a substring of the device name (vendor datasheets; H100 and H200 SXM share the chip's
rate). Any other device: unknown, and no utilisation is printed."""
ASSUMED_MFU = 0.33
"""For the budget only: the utilisation a configuration's time is estimated at before it runs."""
START_UP_S = 45.0
"""For the budget only: a configuration's process start, imports, weights drawn and store written."""
PREP_RESERVE_S = {"real": 150.0, "tiny": 90.0}
"""Seconds of the budget the training rows leave to `bench_prep.py real-size`, by --arch (real: the VAE at both
sizes and T5-XXL, one warm-up and two measured runs of each)."""
PREP_OPTIONS = {"real": ["--warmup", "1", "--repeats", "2"],
                "tiny": ["--vae-clip", "9x32x48", "--t5-layers", "2", "--warmup", "1", "--repeats", "3"]}
"""bench_prep.py real-size's options by --arch: the real sizes, or for the CPU rehearsal a 9x32x48 clip and 2
T5-XXL layers (real widths: about 2.5 GB of host memory) on cogprep's 226 tokens. T5 is projected from the time
of 1 layer and of 2, and the suite checks that projection: each is timed after an untimed run (the first run
pays one-time costs, which made 1 layer slower than 2), on enough tokens that a layer's time (about 2 s) stands
above a busy CPU's noise, and the median of 3 runs kept (one run each let a load spike make 1 layer slower than 2
on a machine running three test suites)."""

REAL_CONFIGS = [  # (name, bench_train.py options); the target-bearing ones first, so a short budget keeps them
    ("5b LoRA r128 49x480x720 fp8+offload", ["--arch", "5b", "--base-weights", "fp8", "--offload-checkpoints"]),
    ("5b LoRA r128 49x480x720 plain", ["--arch", "5b"]),
    ("5b LoRA r128 49x480x720 offload", ["--arch", "5b", "--offload-checkpoints"]),
    ("5b LoRA r128 49x480x720 fp8", ["--arch", "5b", "--base-weights", "fp8"]),
    ("1.5-5B-I2V LoRA r128 81x768x1360 fp8+offload",
     ["--arch", "1.5-5b-i2v", "--base-weights", "fp8", "--offload-checkpoints"]),
    ("1.5-5B-I2V LoRA r128 81x768x1360 plain", ["--arch", "1.5-5b-i2v"]),
    ("5b full fine-tune 49x480x720 adamw8bit", ["--arch", "5b", "--mode", "sft", "--optimizer", "adamw8bit"]),
    ("1.5-5B-I2V LoRA r128 81x768x1360 offload", ["--arch", "1.5-5b-i2v", "--offload-checkpoints"]),
    ("1.5-5B-I2V LoRA r128 81x768x1360 fp8", ["--arch", "1.5-5b-i2v", "--base-weights", "fp8"]),
]
TINY = ["--arch", "tiny", "--rank", "8", "--frames", "9", "--height", "32", "--width", "48"]
TINY_CONFIGS = [  # the same code paths at the tiny model's size (it is a text-to-video 5b: no I2V rows)
    ("tiny LoRA r8 9x32x48 fp8+offload", [*TINY, "--base-weights", "fp8", "--offload-checkpoints"]),
    ("tiny LoRA r8 9x32x48 plain", TINY),
    ("tiny full fine-tune 9x32x48 adamw8bit", [*TINY, "--mode", "sft", "--optimizer", "adamw8bit"]),
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    device_name, peak_tflops = detect_device(args.device)
    print(f"gpu_check: {device_name}, bf16 peak {f'{peak_tflops:g} TFLOPS' if peak_tflops else 'unknown'}, "
          f"budget {args.budget_s:g} s, results in {out}", flush=True)
    configs = (REAL_CONFIGS if args.arch == "real" else TINY_CONFIGS)[: args.limit]
    if args.device == "cpu":  # bitsandbytes' 8-bit AdamW needs CUDA: the CPU run takes plain AdamW in its place
        configs = [(name, [o if o != "adamw8bit" else "adamw" for o in options]) for name, options in configs]

    # the meta-device counts (and each step's model FLOPs) on the CPU, beside the GPU's measurements
    dry_runs = {}
    for index, (name, options) in enumerate(configs):
        result = out / f"meta-{index}.json"
        log = open(out / f"meta-{index}.log", "w")
        dry_runs[name] = (result, subprocess.Popen(
            [sys.executable, str(SCRIPTS / "bench_train.py"), *options, "--dry-run", "--json", str(result)],
            stdout=log, stderr=subprocess.STDOUT, env=child_environment(threads=2)))

    rows = []
    reserve = 0.0 if args.skip_prep else PREP_RESERVE_S[args.arch]
    for index, (name, options) in enumerate(configs):
        left = args.budget_s - reserve - (time.monotonic() - started)
        flops = meta_counts(dry_runs[name], wait_s=0 if peak_tflops else None).get("model_flops_per_step")
        estimate = START_UP_S + (args.warmup + args.steps) * (
            flops / (ASSUMED_MFU * peak_tflops * 1e12) if flops and peak_tflops else 0.0)
        row = {"config": name, "options": options}
        if estimate > left:
            row["skipped"] = f"budget: about {estimate:.0f} s needed, {max(left, 0):.0f} s left"
        else:
            row.update(measure(args, options, out / f"run-{index}.json", timeout_s=left))
        rows.append(row)
        done = row.get("skipped") or row.get("error") or f"{row['median_s']:.3f} s/step"
        print(f"gpu_check: {name}: {done}", flush=True)
    for row, (name, _) in zip(rows, configs):
        counts = meta_counts(dry_runs[name], wait_s=max(30.0, args.budget_s - (time.monotonic() - started)))
        row["meta_peak_gib"] = counts.get("meta_device_memory_gb", {}).get("peak")
        row["model_flops_per_step"] = counts.get("model_flops_per_step")
        if peak_tflops and row.get("median_s") and row["model_flops_per_step"]:
            row["mfu"] = row["model_flops_per_step"] / row["median_s"] / (peak_tflops * 1e12)

    left = args.budget_s - (time.monotonic() - started)
    prep = None if args.skip_prep else measure_prep(args, out / "prep.json", timeout_s=left)
    checks = {}
    if not args.skip_tests:
        checks["activation offload tests"] = run_check(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(ROOT / "tests" /
                                                                                     "test_activation_offload.py")],
            timeout_s=max(60.0, args.budget_s - (time.monotonic() - started)), log=out / "activation-offload.log")
    if not args.skip_fsdp:
        if args.device != "cuda":
            checks["FSDP 1 process, export into the pipeline"] = "skipped: accelerate runs FSDP on GPUs only"
        else:
            checks["FSDP 1 process, export into the pipeline"] = fsdp_export_check(out, timeout_s=max(
                120.0, args.budget_s - (time.monotonic() - started)))

    print_table(rows, checks, device_name, peak_tflops, args, time.monotonic() - started)
    print_prep(prep)
    summary = {"device": device_name, "peak_bf16_tflops": peak_tflops, "rows": rows, "prep": prep, "checks": checks,
               "seconds": round(time.monotonic() - started, 1)}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    failed = [r for r in [*rows, prep or {}] if "error" in r] + [c for c in checks.values() if c.startswith("FAIL")]
    return 1 if failed else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where the steps run (default cuda)")
    parser.add_argument("--arch", choices=("real", "tiny"), default="real",
                        help="real: the releases' sizes (a GPU's job); tiny: the tiny model at 9x32x48, rank 8 "
                             "(the CPU rehearsal the suite runs)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="seconds for everything (default 480): configurations that no longer fit are skipped")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per configuration (default 3)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per configuration (default 5)")
    parser.add_argument("--out", type=Path, help="folder for the JSON results and logs (default: a temporary one)")
    parser.add_argument("--limit", type=int, help="run only the first N configurations (default all)")
    parser.add_argument("--skip-prep", action="store_true",
                        help="leave out bench_prep.py real-size (and give its reserved time to the training rows)")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the activation-offload tests")
    parser.add_argument("--skip-fsdp", action="store_true", help="leave out the 1-process FSDP export run")
    return parser.parse_args(argv)


def detect_device(device: str) -> tuple[str, float | None]:
    """The device's name and its dense bf16 peak in TFLOPS (None where PEAK_BF16_TFLOPS has no entry)."""
    import torch

    if device == "cpu":
        return f"CPU ({os.cpu_count()} cores)", None
    if not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda: no CUDA device is visible (--device cpu rehearses on the CPU)")
    name = torch.cuda.get_device_name()
    return name, next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def child_environment(threads: int | None = None) -> dict[str, str]:
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:  # the dry runs share the CPU cores with the measured process's own threads
        environment.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return environment


def meta_counts(dry_run: tuple[Path, subprocess.Popen], wait_s: float | None) -> dict:
    """The dry run's JSON once it has finished (waiting up to `wait_s`, None: as long as it takes); {} if not."""
    result, process = dry_run
    try:
        process.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        if wait_s and wait_s >= 30:  # the last wait: nothing more will come
            process.kill()
        return {}
    return json.loads(result.read_text()) if result.exists() else {}


def measure(args: argparse.Namespace, options: list[str], result: Path, timeout_s: float) -> dict:
    """cogtrain's step for one configuration, in bench_train.py's fresh process: median s/step and peaks."""
    command = [sys.executable, str(SCRIPTS / "bench_train.py"), *options, "--device", args.device, "--variants",
               "cogtrain", "--rounds", "1", "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--json", str(result)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=child_environment())
    except subprocess.TimeoutExpired:
        return {"skipped": f"budget: stopped after {timeout_s:.0f} s"}
    if done.returncode != 0 or not result.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {done.returncode}: {tail[0]}"}
    cogtrain = json.loads(result.read_text())["variants"]["cogtrain"]
    if "skipped" in cogtrain:  # e.g. out of memory: a finding, not a failure of the check
        return {"skipped": cogtrain["skipped"]}
    peaks = cogtrain["peak_memory_bytes"]
    return {
        "median_s": cogtrain["median_s"],
        "allocated_gib": peaks.get("cuda_max_allocated", peaks["host_peak_anon_growth"]) / GIB,
        "reserved_gib": peaks["cuda_max_reserved"] / GIB if "cuda_max_reserved" in peaks else None,
        "final_losses": cogtrain["final_losses"],
    }


def measure_prep(args: argparse.Namespace, result: Path, timeout_s: float) -> dict:
    """`bench_prep.py real-size` in a fresh process: the VAE's and T5-XXL's seconds and peaks, clips per minute."""
    if timeout_s < PREP_RESERVE_S[args.arch] / 2:
        return {"skipped": f"budget: {max(timeout_s, 0):.0f} s left"}
    command = [sys.executable, str(SCRIPTS / "bench_prep.py"), "real-size", "--device", args.device,
               *PREP_OPTIONS[args.arch], "--json-out", str(result)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=child_environment())
    except subprocess.TimeoutExpired:
        return {"skipped": f"budget: stopped after {timeout_s:.0f} s"}
    (result.parent / "prep.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not result.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {done.returncode}: {tail[0]}"}
    return json.loads(result.read_text())


def print_prep(prep: dict | None) -> None:
    if prep is None:
        return
    if "clips_per_minute_49x480x720" not in prep:
        print(f"cogprep at real size (bench_prep.py real-size): {prep.get('skipped') or prep.get('error')}")
        return
    print("cogprep at real size (bench_prep.py real-size, random weights; seconds, peak GiB):")
    for clip, vae in prep["vae"].items():
        how = f"projected from {vae['measured_clip']}" if vae["projected"] else "measured"
        print(f"  VAE encode {clip:<12} {vae['seconds']:>10.2f} s {vae['peak_gib']:>8.2f} GiB  {how}")
    t5 = prep["t5"]
    how = f"projected from {t5['layers_measured']} layers" if t5["projected"] else "measured"
    print(f"  T5-XXL {t5['tokens']:>3} tokens      {t5['seconds']:>10.3f} s {t5['peak_gib']:>8.2f} GiB  {how}")
    print(f"  clips/min at 49x480x720, decoding hidden: {prep['clips_per_minute_49x480x720']:.2f} (target >= "
          f"{prep['target_clips_per_minute']:g} on one H100: {prep['target']})")


def run_check(command: list[str], timeout_s: float, log: Path) -> str:
    """'PASS' or 'FAIL: the last line', the whole output in `log`."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=child_environment(),
                              cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        log.write_text(f"{e.stdout or ''}{e.stderr or ''}")
        return f"FAIL: over {timeout_s:.0f} s"
    log.write_text(done.stdout + done.stderr)
    last = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
    return f"PASS ({last[0]})" if done.returncode == 0 else f"FAIL: {last[0]}"


FSDP_EXPORT = r'''
import sys, torch
from pathlib import Path
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
model, run = Path(sys.argv[1]), Path(sys.argv[2])
transformer = CogVideoXTransformer3DModel.from_pretrained(run / "transformer")
pipe = CogVideoXPipeline.from_pretrained(model, transformer=transformer).to("cuda")
video = pipe("a red circle", num_frames=9, height=32, width=48, num_inference_steps=2, output_type="pt").frames
assert torch.isfinite(video).all(), "the exported transformer gives non-finite frames"
print("exported transformer loaded into CogVideoXPipeline and ran:", tuple(video.shape))
'''


def fsdp_export_check(out: Path, timeout_s: float) -> str:
    """The tiny model trained 2 steps (full fine-tune) under FSDP on 1 process, its exported transformer loaded
    into CogVideoXPipeline and run: the gather-and-export path cogtune's CPU suite cannot launch."""
    work = out / "fsdp"
    python = sys.executable
    deadline = time.monotonic() + timeout_s
    steps = [
        [python, str(SCRIPTS / "make_tiny_model.py"), "--variant", "5b", "--out", str(work / "model")],
        [python, str(SCRIPTS / "make_demo_dataset.py"), "--out", str(work / "data"), "--count", "2"],
        [python, "-m", "cogtune.preprocess.cli", "encode", str(work / "data"), "--model", str(work / "model"),
         "--out", str(work / "store"), "--resolution", "9x32x48", "--device", "cuda", "--no-progress"],
        [python, "-m", "accelerate.commands.launch", "--config_file", str(SCRIPTS / "accelerate_fsdp.yaml"),
         "--num_processes", "1", "-m", "cogtune.train.cli", "run", "--store", str(work / "store"), "--model",
         str(work / "model"), "--out", str(work / "run"), "--mode", "sft", "--max-steps", "2", "--no-progress"],
        [python, "-c", FSDP_EXPORT, str(work / "model"), str(work / "run")],
    ]
    for number, command in enumerate(steps):
        result = run_check(command, timeout_s=max(deadline - time.monotonic(), 1.0),
                           log=out / f"fsdp-{number}.log")
        if not result.startswith("PASS"):
            return f"{result} (step {number + 1} of {len(steps)}: {' '.join(command[1:4])})"
    return "PASS"


def print_table(rows: list[dict], checks: dict[str, str], device: str, peak: float | None,
                args: argparse.Namespace, seconds: float) -> None:
    memory = "allocated GiB" if args.device == "cuda" else "host peak GiB"
    print(f"\ngpu_check on {device}: cogtrain's step, batch 1, bf16, gradient checkpointing, {args.warmup} warm-up "
          f"+ {args.steps} measured steps each; MFU: model FLOPs (forward + backward, recompute excluded) over the "
          f"median step, against {f'{peak:g} TFLOPS bf16' if peak else 'an unknown peak'}")
    header = f"{'configuration':<46} {memory:>14} {'reserved GiB':>13} {'median s/step':>14} {'MFU':>6} {'meta GiB':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        meta = f"{row['meta_peak_gib']:.2f}" if row.get("meta_peak_gib") is not None else "-"
        if "median_s" not in row:
            print(f"{row['config']:<46} {row.get('skipped') or row.get('error')}  (meta {meta})")
            continue
        reserved = f"{row['reserved_gib']:.2f}" if row["reserved_gib"] is not None else "-"
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
        print(f"{row['config']:<46} {row['allocated_gib']:>14.3f} {reserved:>13} {row['median_s']:>14.3f} "
              f"{mfu:>6} {meta:>9}")
    for name, verdict in checks.items():
        print(f"{name}: {verdict}")
    print(f"gpu_check took {seconds:.0f} s (budget {args.budget_s:g} s)")


if __name__ == "__main__":
    sys.exit(main())
