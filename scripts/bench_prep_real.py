"""cogprep's two models at their published size: the CogVideoX VAE encoding a clip and T5-XXL embedding a
caption, random weights (nothing to download), peak memory and time, and the clips per minute they allow.

    python scripts/bench_prep.py real-size [--device cuda|cpu] [--vae-clip FxHxW] [--t5-layers K]
                                           [--vae-tiling] [--repeats N] [--warmup N] [--json-out prep.json]
    (or python scripts/bench_prep_real.py with the same options)

  VAE: AutoencoderKLCogVideoX with THUDM/CogVideoX-5b's vae/config.json encoding a 49x480x720 clip, and with
       THUDM/CogVideoX1.5-5B's encoding an 81x768x1360 one (the configs are in scripts/cogvideox_5b.py), as
       cogprep calls it (`vae.encode(x).latent_dist`, the clip in [-1, 1], the dtype cogprep picks: bfloat16 on
       a GPU, float32 on the CPU). The encoder runs over 8-frame batches with a cache between them, so its cost
       and memory grow linearly with the frames and the pixels: on the CPU, where a real-size encode takes tens
       of minutes and more memory than a shared machine has, --vae-clip (default 9x240x360 there) measures a
       smaller clip (default 9x96x144) and each real size is projected from it by its frames x pixels (see
       `project_vae`). On cuda the real sizes are
       measured as they are.
  T5:  T5EncoderModel with google/t5-v1_1-xxl's config (d_model 4096, d_ff 10240, 64 heads of 64, 24 layers,
       vocab 32128) embedding one 226-token caption (cogprep pads every caption to 226 tokens, so the cost does
       not depend on the words). --t5-layers K < 24 builds the real widths with fewer layers (its float32
       weights alone are 19 GB at 24 layers): 1 and K layers are measured, and the 24-layer figures are
       projected as the 1-layer one plus 23 times the per-layer difference.
  Clips per minute at 49x480x720 = 60 / (VAE seconds + T5 seconds), with decoding hidden: cogprep decodes the
  next clips in DataLoader workers and packs on a thread while the models run. Target on one H100-class GPU:
  >= 30 clips/min (pending where no such GPU ran it).
Every figure says whether it was measured or projected. Prints a table, then the results as JSON.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_report import print_json
from cogvideox_5b import T5_XXL, VAE_5B, VAE_15, materialize
from diffusers import AutoencoderKLCogVideoX
from diffusers.utils import logging as diffusers_logging
from transformers import T5Config, T5EncoderModel

GIB = 2**30
CLIPS = {"49x480x720": VAE_5B, "81x768x1360": VAE_15}
"""The measured clip sizes, each with the VAE config of the release trained at it (CogVideoX-5b, CogVideoX1.5-5B)."""
CPU_VAE_CLIP = "9x96x144"
"""The clip the CPU measures in place of the real sizes: one frame batch of the encoder at a fifth of 480x720
(a minute or two on 2 cores)."""
T5_LAYERS = T5_XXL["num_layers"]
TEXT_TOKENS = 226
TARGET_CLIPS_PER_MINUTE = 30.0
"""On one H100-class GPU at 49x480x720 with decoding hidden (issue 11; users report about 16 a minute on eight
H100s with the reference scripts)."""
TARGET_DEVICES = ("H100", "H200")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    diffusers_logging.set_verbosity_error()  # materialize's dtype cast warns about modules no VAE here has
    results = run(args)
    print_table(results)
    print_json(results, args.json_out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the models run (default: cuda when one is visible, else cpu)")
    parser.add_argument("--vae-clip", help="FxHxW: encode this clip and project the real sizes from it (default: "
                                           f"the real sizes on cuda, {CPU_VAE_CLIP} on the CPU)")
    parser.add_argument("--vae-tiling", action="store_true",
                        help="encode with the VAE's spatial tiling (cogprep --vae-tiling; default off, as cogprep; "
                             "a clip too big for the GPU whole is measured tiled either way, and the table says so)")
    parser.add_argument("--t5-layers", type=int,
                        help=f"T5 layers built (2 to {T5_LAYERS}; default {T5_LAYERS} on cuda, 2 on the CPU): "
                             f"fewer than {T5_LAYERS} are measured at 1 and K layers and projected")
    parser.add_argument("--text-tokens", type=int, default=TEXT_TOKENS,
                        help=f"caption length in tokens (default {TEXT_TOKENS}, what cogprep pads every caption to; "
                             "fewer only to rehearse quickly)")
    parser.add_argument("--repeats", type=int, help="timed runs of each measure, the median kept (default 3 on "
                                                     "cuda, 1 on the CPU)")
    parser.add_argument("--warmup", type=int, help="untimed runs before them (default 1 on cuda, 0 on the CPU, "
                                                    "whose first run costs no kernel compiles)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's default)")
    parser.add_argument("--json-out", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.t5_layers is None:
        args.t5_layers = T5_LAYERS if args.device == "cuda" else 2
    if not 2 <= args.t5_layers <= T5_LAYERS:
        parser.error(f"--t5-layers {args.t5_layers}: from 2 to {T5_LAYERS}")
    cuda = args.device == "cuda"
    args.repeats = args.repeats or (3 if cuda else 1)
    args.warmup = (1 if cuda else 0) if args.warmup is None else args.warmup
    if args.vae_clip is None and args.device == "cpu":
        args.vae_clip = CPU_VAE_CLIP
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    return args


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as cogprep's --dtype auto
    started = time.perf_counter()
    timing = Timing(device, args.warmup, args.repeats)
    if args.vae_clip:  # one reduced clip for both sizes: the two releases' VAEs encode alike (they differ in
        # how the latents are scaled afterwards, which the encoder does not do)
        reduced = measure_vae(VAE_5B, args.vae_clip, args.vae_tiling, dtype, timing)
        vae = {name: project_vae(reduced, name) for name in CLIPS}
    else:
        vae = {}
        for name, config in CLIPS.items():
            try:
                vae[name] = measure_vae(config, name, args.vae_tiling, dtype, timing)
            except torch.cuda.OutOfMemoryError:  # too big for this GPU whole: tiled, as cogprep --vae-tiling
                release(device)
                if args.vae_tiling:
                    raise
                vae[name] = measure_vae(config, name, True, dtype, timing)
            release(device)
    release(device)
    t5 = measure_t5(args.t5_layers, args.text_tokens, dtype, timing)
    clip_s = vae["49x480x720"]["seconds"] + t5["seconds"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    on_target_device = any(d in name for d in TARGET_DEVICES)
    projected = vae["49x480x720"]["projected"] or t5["projected"]
    return {
        "device": name, "cpu_threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "vae": vae, "t5": t5,
        "clips_per_minute_49x480x720": 60.0 / clip_s,
        "clips_per_minute_projected": projected,
        "target_clips_per_minute": TARGET_CLIPS_PER_MINUTE,
        "target": ("pending: needs a measured run on an H100-class GPU" if projected or not on_target_device
                   else "PASS" if 60.0 / clip_s >= TARGET_CLIPS_PER_MINUTE else "FAIL"),
        "bench_seconds": round(time.perf_counter() - started, 1),
    }


def parse_clip(text: str) -> tuple[int, int, int]:
    frames, height, width = (int(n) for n in text.lower().split("x"))
    return frames, height, width


def measure_vae(config: dict, clip: str, tiling: bool, dtype: torch.dtype, timing: Timing) -> dict:
    """One clip through the VAE as cogprep encodes it: seconds, peak memory, the latent's shape."""
    device = timing.device
    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX.from_config(config)
    vae = materialize(vae, device.type, dtype, seed=1).eval()
    if tiling:
        vae.enable_tiling()
    x = torch.rand(1, 3, *parse_clip(clip), device=device, dtype=dtype) * 2 - 1

    def encode():
        with torch.no_grad():
            return vae.encode(x).latent_dist.mean

    seconds, peak, latent = timing.run(encode)
    result = {"clip": clip, "measured_clip": clip, "projected": False, "tiling": tiling,
              "latent_shape": list(latent.shape), "weights_gib": parameter_bytes(vae) / GIB,
              "input_gib": x.numel() * x.element_size() / GIB, "measured_seconds": seconds, "measured_peak": peak,
              "seconds": seconds, "peak_gib": peak["peak_gib"]}
    return result  # the VAE and its tensors go with this frame: the caller releases them


def project_vae(measured: dict, clip: str) -> dict:
    """A measured smaller clip's figures carried to `clip`: time by frames x pixels (the encoder's convolutions
    and norms cost the same per voxel); memory as the weights, the clip's input, and the activations, which grow
    with the pixels and the frames of one encoder batch (at most 9: the first frame and 8 more), not with the
    clip's length."""
    frames, height, width = parse_clip(measured["measured_clip"])
    real = parse_clip(clip)
    voxels = real[0] * real[1] * real[2] / (frames * height * width)
    activations = measured["measured_peak"]["growth_gib"] * real[1] * real[2] / (height * width) \
        * min(real[0], 9) / min(frames, 9)
    return measured | {"clip": clip, "projected": True, "seconds": measured["measured_seconds"] * voxels,
                       "peak_gib": measured["weights_gib"] + measured["input_gib"] * voxels + activations}


def measure_t5(layers: int, tokens: int, dtype: torch.dtype, timing: Timing) -> dict:
    """One caption of `tokens` tokens through T5-XXL: measured at 24 layers, or at 1 and `layers` and projected."""
    depths = [T5_LAYERS] if layers == T5_LAYERS else [1, layers]
    measured = {}
    for depth in depths:
        measured[depth] = measure_t5_depth(depth, tokens, dtype, timing)
        release(timing.device)
    common = {"tokens": tokens, "layers_measured": depths, "measured": measured}
    if layers == T5_LAYERS:
        full = measured[T5_LAYERS]
        return common | {"projected": False, "seconds": full["seconds"], "weights_gib": full["weights_gib"],
                         "peak_gib": full["peak_gib"]}

    def project(key: str) -> tuple[float, float]:
        """(per layer, at 24 layers) of a figure measured at 1 and `layers` layers."""
        per_layer = (measured[layers][key] - measured[1][key]) / (layers - 1)
        return per_layer, measured[1][key] + (T5_LAYERS - 1) * per_layer

    per_layer_s, seconds = project("seconds")
    per_layer_weights, weights = project("weights_gib")
    # without gradients the activations do not pile up over the layers: the deeper run's are what 24 layers hold
    return common | {"projected": True, "seconds_per_layer": per_layer_s, "weights_gib_per_layer": per_layer_weights,
                     "seconds": seconds, "weights_gib": weights, "peak_gib": weights + measured[layers]["growth_gib"]}


def measure_t5_depth(depth: int, tokens: int, dtype: torch.dtype, timing: Timing) -> dict:
    """T5-XXL's widths at `depth` layers embedding one caption: seconds, weights and peak memory."""
    device = timing.device
    with torch.device("meta"):
        encoder = T5EncoderModel(T5Config(**{**T5_XXL, "num_layers": depth}))
    encoder = materialize(encoder, device.type, dtype, seed=2).eval()
    # to_empty gives each module its own tensor, untying the embedding T5 shares with its encoder: tie it back
    # (one 32128 x 4096 table, as the checkpoint holds), so that the weights measured are the real ones
    encoder.encoder.embed_tokens.weight = encoder.shared.weight
    ids = torch.randint(0, T5_XXL["vocab_size"], (1, tokens), device=device,
                        generator=torch.Generator(device).manual_seed(0))

    def embed():
        with torch.no_grad():
            return encoder(ids)[0]

    seconds, peak, _ = timing.run(embed)
    return {"seconds": seconds, "weights_gib": parameter_bytes(encoder) / GIB, **peak}


@dataclass
class Timing:
    device: torch.device
    warmup: int
    repeats: int

    def run(self, fn):
        """(median seconds of `repeats` calls after `warmup` more, peak memory of them, the last call's result)."""
        for _ in range(self.warmup):
            fn()
        synchronize(self.device)
        floor = reset_peak(self.device)
        times = []
        for _ in range(self.repeats):
            started = time.perf_counter()
            result = fn()
            synchronize(self.device)
            times.append(time.perf_counter() - started)
        return statistics.median(times), read_peak(self.device, floor), result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> float:
    """Start counting the peak anew; returns the GiB held now (the floor the peak grows from)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / GIB
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak resident set (VmHWM) to the current
    return process_memory_gib("VmRSS:")


def read_peak(device: torch.device, floor_gib: float) -> dict:
    """Peak GiB since `reset_peak`, and its growth over the floor: CUDA's allocated (and reserved) bytes, or on
    the CPU the process's resident set (everything it holds: the weights, the input, torch's and Python's own)."""
    if device.type == "cuda":
        peak = {"peak_gib": torch.cuda.max_memory_allocated() / GIB,
                "reserved_gib": torch.cuda.max_memory_reserved() / GIB}
    else:
        peak = {"peak_gib": process_memory_gib("VmHWM:")}
    return peak | {"growth_gib": peak["peak_gib"] - floor_gib}


def process_memory_gib(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(field)) * 1024 / GIB


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def print_table(r: dict) -> None:
    def how(projected: bool) -> str:
        return "projected" if projected else "measured"

    print(f"cogprep's models at real size on {r['device']} ({r['dtype']}, {r['cpu_threads']} CPU threads, load "
          f"{r['load_average_1min']}), random weights:")
    print(f"{'measure':<58} {'seconds':>9} {'peak GiB':>9}  how")
    for clip, v in r["vae"].items():
        basis = f" from {v['measured_clip']}" if v["projected"] else ""
        print(f"{'VAE encode ' + clip + (' tiled' if v['tiling'] else ''):<58} {v['seconds']:>9.2f} "
              f"{v['peak_gib']:>9.2f}  {how(v['projected'])}{basis} ({v['measured_seconds']:.2f} s, "
              f"{v['measured_peak']['peak_gib']:.2f} GiB measured)")
    t = r["t5"]
    if t["projected"]:
        for depth, m in t["measured"].items():
            name = f"T5-XXL widths, {depth} layer(s), {t['tokens']} tokens"
            print(f"{name:<58} {m['seconds']:>9.3f} {m['peak_gib']:>9.2f}  measured")
        print(f"{'  per layer':<58} {t['seconds_per_layer']:>9.3f} {t['weights_gib_per_layer']:>9.2f}  "
              f"difference (GiB: weights)")
    name = f"T5-XXL, 24 layers, {t['tokens']} tokens"
    print(f"{name:<58} {t['seconds']:>9.3f} {t['peak_gib']:>9.2f}  {how(t['projected'])}")
    rate = r["clips_per_minute_49x480x720"]
    print(f"{'clips/min at 49x480x720, decoding hidden (VAE + T5)':<58} {rate:>9.2f} {'':>9}  "
          f"{how(r['clips_per_minute_projected'])}; target >= {r['target_clips_per_minute']:g} on one H100: "
          f"{r['target']}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
