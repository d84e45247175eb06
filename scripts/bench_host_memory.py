"""Host memory of one cogprep rank loading CogVideoX's text encoder (T5-XXL): loaded to the CPU and then moved
(the old `model.load_text_encoder(dtype).to(device)`) against loaded straight onto the device
(`model.load_text_encoder(dtype, device)`, the loaders' own device_map).

    python scripts/bench_host_memory.py [--layers 1 2] [--file-dtypes float16 bfloat16] [--json-out FILE]

Nothing is downloaded. The full T5-XXL encoder (google/t5-v1_1-xxl's config: d_model 4096, d_ff 10240, 24 layers,
64 heads of 64, vocabulary 32128) and the release VAE are counted on the meta device. Then random weights of T5-XXL
cut to each of --layers layers are saved as a model folder, in each of --file-dtypes (the 2b release's T5 is
float16, the 5b ones' bfloat16), and each is loaded in bfloat16 (cogprep's dtype on a GPU) by both paths, each in a
fresh process that samples its private (anonymous) resident memory every 2 ms and reads its RSS high-water mark.
The peak grows linearly with depth, so a line through the depths measured gives the 24-layer figure.

The target device is cuda:0 where there is one; on a CPU-only machine it is the meta device, which stands in for
an accelerator: what lands there takes no host memory, so what each path leaves in host memory is what it would
leave there on the way to a GPU. Private memory is what N ranks add up. A checkpoint already in bfloat16 is mapped
from its file by transformers either way: moving it to a GPU reads it through the page cache, which the ranks
share and the kernel can reclaim, and which the meta target does not read. Linux only (/proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64)
"""google/t5-v1_1-xxl's encoder, CogVideoX's text encoder."""
PATHS = {"host_first": "loaded to the CPU, then moved", "on_device": "loaded straight onto the device"}
MB = 1 << 20
"""The figures' unit (the JSON's *_mb): MiB."""


def t5_config(num_layers: int, d_model: int, d_ff: int, vocab_size: int):
    from transformers import T5Config

    heads = max(1, d_model // 64)
    return T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=d_ff, num_layers=num_layers, num_heads=heads,
                    d_kv=d_model // heads, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)


def counted_bytes() -> dict[str, int]:
    """Bytes in bfloat16 of the full T5-XXL encoder and of the release VAE, counted on the meta device."""
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5EncoderModel

    with torch.device("meta"):
        t5 = T5EncoderModel(t5_config(XXL["num_layers"], XXL["d_model"], XXL["d_ff"], XXL["vocab_size"]))
        vae = AutoencoderKLCogVideoX()  # diffusers' defaults are the release VAE's architecture
    # the tied embedding counts once, as it is stored
    count = {name: sum(p.numel() for p in module.parameters()) for name, module in (("t5", t5), ("vae", vae))}
    return {f"{name}_bf16_bytes": 2 * n for name, n in count.items()}


def write_t5(folder: Path, num_layers: int, file_dtype: torch.dtype, d_model: int, d_ff: int, vocab: int) -> int:
    """Save random weights of a `num_layers`-layer T5 in `file_dtype` as ``folder/text_encoder``; returns its bytes."""
    from transformers import T5EncoderModel

    with torch.device("meta"):
        t5 = T5EncoderModel(t5_config(num_layers, d_model, d_ff, vocab)).to(file_dtype)
    t5.to_empty(device="cpu")  # allocated in the file's dtype: no float32 copy of the model here
    t5.tie_weights()  # to_empty gives the tied embedding (shared, encoder.embed_tokens) two tensors: one again
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in t5.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    t5.save_pretrained(folder / "text_encoder", safe_serialization=True)
    return sum(p.numel() * p.element_size() for p in t5.parameters())


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}: Linux only")


def measure_load(model_dir: Path, path: str, target: str) -> dict[str, float]:
    """In this process: load `model_dir`'s T5 in bfloat16 by `path` onto `target`; peak private memory and RSS
    high-water mark above what the process held before, in MB."""
    from cogtune.shared.models import Model
    from transformers import T5EncoderModel  # noqa: F401  imported before the baseline: no part of the load

    model = Model(path=model_dir, source=str(model_dir))

    base_anon, base_hwm = _status_mb("RssAnon"), _status_mb("VmHWM")
    peak = [base_anon]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _status_mb("RssAnon"))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if path == "host_first":
        text_encoder = model.load_text_encoder("bfloat16").to(target)
    else:
        text_encoder = model.load_text_encoder("bfloat16", target)
    done.set()
    sampler.join()
    assert next(text_encoder.parameters()).device.type == torch.device(target).type
    anon_peak = max(peak[0], _status_mb("RssAnon"))
    return {"anon_peak_mb": anon_peak - base_anon, "rss_hwm_mb": _status_mb("VmHWM") - base_hwm}


def _measure_in_child(model_dir: Path, path: str, target: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--measure", str(model_dir), path, target]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench_host_memory: measuring {path} on {model_dir} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit_line(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys over xs; with one point, a line through the origin."""
    if len(set(xs)) < 2:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def run(args: argparse.Namespace) -> dict:
    target = "cuda:0" if torch.cuda.is_available() else "meta"
    result: dict = {"target": target, "counted": counted_bytes(), "depths": args.layers, "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-host-memory-") as tmp:
        for file_dtype in args.file_dtypes:
            for layers in args.layers:
                folder = Path(tmp) / f"{file_dtype}-{layers}"
                size = write_t5(folder, layers, getattr(torch, file_dtype), args.d_model, args.d_ff, args.vocab)
                for path in PATHS:
                    measured = _measure_in_child(folder, path, target)
                    result["rows"].append({"file_dtype": file_dtype, "layers": layers, "path": path,
                                           "weights_mb": size / MB, **measured})
    result["t5_xxl_per_rank_mb"] = _extrapolate(result["rows"], XXL["num_layers"])
    return result


def _extrapolate(rows: list[dict], layers: int) -> dict[str, dict[str, float]]:
    """Anonymous peak of each (file dtype, path) at `layers` layers, by a line through the depths measured."""
    out: dict[str, dict[str, float]] = {}
    for file_dtype in sorted({r["file_dtype"] for r in rows}):
        for path in PATHS:
            mine = [r for r in rows if r["file_dtype"] == file_dtype and r["path"] == path]
            intercept, slope = fit_line([r["layers"] for r in mine], [r["anon_peak_mb"] for r in mine])
            out.setdefault(file_dtype, {})[path] = max(0.0, intercept + slope * layers)
    return out


def print_table(result: dict) -> None:
    counted = result["counted"]
    print(f"T5-XXL encoder: {counted['t5_bf16_bytes'] / 1e9:.2f} GB in bfloat16; VAE "
          f"{counted['vae_bf16_bytes'] / 1e9:.2f} GB (counted on the meta device); target device: {result['target']}")
    print(f"{'file dtype':<10} {'layers':>6} {'weights MiB':>10}  {'path':<34} {'private peak MiB':>15} "
          f"{'RSS high-water MiB':>17}")
    for r in result["rows"]:
        print(f"{r['file_dtype']:<10} {r['layers']:>6} {r['weights_mb']:>10.0f}  {PATHS[r['path']]:<34} "
              f"{r['anon_peak_mb']:>15.0f} {r['rss_hwm_mb']:>17.0f}")
    print(f"T5-XXL (24 layers) private host memory per cogprep rank, by a line through depths {result['depths']}:")
    for file_dtype, paths in result["t5_xxl_per_rank_mb"].items():
        before, after = paths["host_first"], paths["on_device"]
        print(f"  {file_dtype} checkpoint: {PATHS['host_first']} {before / 1024:.2f} GiB, {PATHS['on_device']} "
              f"{after:.0f} MiB (8 ranks: {8 * before / 1024:.1f} GiB -> {8 * after:.0f} MiB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2],
                        help="T5 depths measured, for the line to 24 layers (default 1 2)")
    parser.add_argument("--file-dtypes", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16"],
                        help="dtypes the weights are saved in (default float16 bfloat16: the 2b and 5b releases')")
    parser.add_argument("--d-model", type=int, default=XXL["d_model"], help="T5 width (default T5-XXL's 4096)")
    parser.add_argument("--d-ff", type=int, default=XXL["d_ff"], help="T5 feed-forward width (default T5-XXL's 10240)")
    parser.add_argument("--vocab", type=int, default=XXL["vocab_size"], help="T5 vocabulary (default T5-XXL's 32128)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--measure", nargs=3, metavar=("MODEL_DIR", "PATH", "TARGET"), default=None,
                        help="internal: measure one load in this process and print it as JSON")
    args = parser.parse_args(argv)
    if args.measure:
        model_dir, path, target = args.measure
        print(json.dumps(measure_load(Path(model_dir), path, target)))
        return
    if min(args.layers) < 1:
        parser.error("--layers must be 1 or more")
    result = run(args)
    print_table(result)
    print(json.dumps(result))
    if args.json_out is not None:
        from cogtune.shared.atomic import atomic_write_text

        atomic_write_text(args.json_out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
