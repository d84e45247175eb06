"""cogprep: encode a video dataset once into a bucketed, content-keyed store for cogtrain."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Optional

import typer

from ..shared import store as S
from ..shared.buckets import BucketSpec, bucket_spec_from_resolution, check_buckets_for_model, load_bucket_spec
from ..shared.cli import make_app
from ..shared.config import config_option
from ..shared.errors import CogtuneError, exit_on_user_error
from ..shared.fingerprint import FileHashes
from ..shared.models import Model, open_model
from .datasets import read_dataset
from .encode import PREP_COMPONENTS, RunOptions, human_bytes, model_fingerprints, run_encode, store_bytes
from .frames import FrameSampling
from .plan import CACHE_DIR, EncodeSettings, plan_encode

app = make_app(
    "cogprep",
    "Encode a video dataset once (VAE latents, T5 embeddings, I2V first frames) into a bucketed store that "
    "cogtrain reads; re-running after a dataset edit encodes only what changed.",
)


def native_size(model: Model) -> tuple[int, int, int]:
    """(frames, height, width) the model was trained at: its transformer config for 1.0 (sample_* in latents),
    the release table for 1.5 (whose sample size is the RoPE grid's maximum, not a training size)."""
    v = model.variant
    if v.generation == "1.5":
        return v.native_frames, v.native_height, v.native_width
    tc = model.config("transformer")
    return tc.get("sample_frames", v.native_frames), tc["sample_height"] * 8, tc["sample_width"] * 8


def spec_to_json(spec: BucketSpec) -> dict[str, Any]:
    return {
        "frames_by_resolution": [[h, w, list(f)] for (h, w), f in sorted(spec.frames_by_resolution.items())],
        "batch_size": spec.batch_size,
        "batch_sizes": dict(sorted(spec.batch_sizes.items())),
        "token_budget": spec.token_budget,
        "source": spec.source,
    }


def spec_from_json(data: dict[str, Any]) -> BucketSpec:
    return BucketSpec({(h, w): tuple(f) for h, w, f in data["frames_by_resolution"]}, data["batch_size"],
                      dict(data["batch_sizes"]), data["token_budget"], data["source"])


def _bucket_spec(model: Model, resolution: str | None, buckets: Path | None) -> BucketSpec:
    if resolution and buckets:
        raise CogtuneError("give --resolution or --buckets, not both")
    if buckets is not None:
        spec = load_bucket_spec(buckets, model.variant)
    else:
        f, h, w = native_size(model)
        spec = bucket_spec_from_resolution(resolution or f"{f}x{h}x{w}", model.variant)
    check_buckets_for_model(spec, model.variant, native_size(model)[1:])
    return spec


@app.command()
@exit_on_user_error
def encode(
    dataset: Path = typer.Argument(..., help="Dataset folder (prompts.txt + videos.txt, a CSV, or JSON/JSONL) or file."),
    model: str = typer.Option(..., "--model", help="CogVideoX model: a local diffusers folder or a hub id."),
    out: Path = typer.Option(..., "--out", help="Store folder to create or update."),
    resolution: Optional[str] = typer.Option(None, help="One bucket FRAMESxHEIGHTxWIDTH (default: the model's native size)."),
    buckets: Optional[Path] = typer.Option(None, help="YAML/TOML bucket file: resolutions, frames, batch sizes, token budget."),
    resize: str = typer.Option("crop", help="crop: cover then centre crop (keeps aspect); stretch: plain resize."),
    fps: Optional[float] = typer.Option(None, help="Resample clips to this frame rate (default: keep the source's)."),
    stride: int = typer.Option(1, help="Take every N-th frame (after fps resampling)."),
    skip_start: float = typer.Option(0.0, help="Seconds to skip at the start of each video."),
    skip_end: float = typer.Option(0.0, help="Seconds to skip at the end of each video."),
    clips: str = typer.Option("head", help="Clips per video: head, uniform:K (K spread clips) or sliding:STRIDE."),
    layout: Optional[str] = typer.Option(None, help="Dataset layout txt, csv or json (default: detected)."),
    caption_column: Optional[str] = typer.Option(None, help="CSV caption column (txt layout: the prompts file name)."),
    video_column: Optional[str] = typer.Option(None, help="CSV video column (txt layout: the videos file name)."),
    id_token: Optional[str] = typer.Option(None, help="Prefix every caption with this token (DreamBooth style)."),
    dtype: str = typer.Option("bfloat16", help="Storage dtype of latents and embeddings (bfloat16, float16, float32)."),
    image_noise_variants: int = typer.Option(4, help="I2V: noise-augmented image encodings cached per clip."),
    seed: int = typer.Option(0, help="Seed of the I2V noise augmentation."),
    validation_prompts: Optional[Path] = typer.Option(None, help="Text file, one prompt a line, embedded for cogtrain's validation."),
    validation_images: Optional[Path] = typer.Option(None, help="I2V: text file of image paths, one per validation prompt."),
    vae_tiling: bool = typer.Option(False, help="Encode in spatial tiles (less memory for large frames)."),
    vae_slicing: bool = typer.Option(False, help="Encode batch items one at a time."),
    text_batch_size: int = typer.Option(16, help="Captions per T5 call."),
    workers: int = typer.Option(2, help="CPU processes decoding and resizing clips while the model encodes."),
    device: str = typer.Option("auto", help="auto (cuda:LOCAL_RANK if present, else cpu), cpu, cuda, cuda:1, ..."),
    strict: bool = typer.Option(False, help="Any bad item: exit 2 and write nothing."),
    verify: bool = typer.Option(False, help="Re-hash every file instead of trusting unchanged size and mtime."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    config: Optional[Path] = config_option(),
) -> None:
    """Encode DATASET into the store OUT (only what is new or changed when OUT exists)."""
    m = open_model(model, PREP_COMPONENTS)
    spec = _bucket_spec(m, resolution, buckets)
    data = read_dataset(dataset, layout, caption_column=caption_column, video_column=video_column, id_token=id_token)
    settings = EncodeSettings(
        buckets=spec_to_json(spec),
        sampling=FrameSampling(fps=fps, stride=stride, skip_start=skip_start, skip_end=skip_end, clips=clips),
        resize=resize,
        dtype=dtype,
        image_noise_variants=image_noise_variants if m.variant.task == "i2v" else 0,
        seed=seed,
        text_length=m.config("transformer").get("max_text_seq_length", m.variant.text_length),
    )
    if resize not in ("crop", "stretch"):
        raise CogtuneError(f"--resize {resize!r}: choose crop or stretch")
    options = RunOptions(device=device, workers=workers, text_batch_size=text_batch_size, vae_tiling=vae_tiling,
                         vae_slicing=vae_slicing, strict=strict, verify=verify,
                         validation_prompts=validation_prompts, validation_images=validation_images,
                         progress=progress)
    info = {"path": str(Path(dataset).resolve()), "layout": data.layout, "file": str(data.file),
            "caption_column": caption_column, "video_column": video_column, "id_token": id_token}
    result = run_encode(data, m, out, spec, settings, options, info)
    from .encode import dist_info

    if dist_info()[0] == 0:
        _print_summary(out, result)


def _print_summary(store: Path, result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    rows = S.read_index(store)
    table = Table(title=f"cogprep: {store}")
    table.add_column("bucket")
    table.add_column("samples", justify="right")
    for name, n in sorted(Counter(r["bucket"] for r in rows).items()):
        table.add_row(name, str(n))
    table.add_row("[b]total[/b]", f"[b]{len(rows)}[/b]")
    console.print(table)
    changes = {k: len(v) for k, v in result.plan.changes.items()}
    console.print(f"encoded {result.encoded_videos} clips and {result.encoded_texts} captions "
                  f"(sources new {changes['new']}, changed {changes['changed']}, removed {changes['removed']}, "
                  f"unchanged {changes['unchanged']}); {human_bytes(store_bytes(store))} on disk; "
                  f"{result.seconds:.1f} s")
    if result.skipped:
        reasons = Counter(_reason_kind(b.reason) for b in result.skipped)
        console.print(f"skipped {len(result.skipped)}: " + ", ".join(f"{k} {n}" for k, n in reasons.most_common())
                      + f" (details in {Path(store) / S.REPORT})")


def _reason_kind(reason: str) -> str:
    text = reason.lower()
    for kind in ("missing", "empty", "usable frames", "decode", "caption", "no partner", "zero", "not a"):
        if kind in text:
            return kind
    return "other"


@app.command()
@exit_on_user_error
def status(
    dataset: Path = typer.Argument(..., help="The dataset folder or file the store was encoded from."),
    store: Path = typer.Option(..., "--store", help="The store to compare with."),
    model: Optional[str] = typer.Option(None, help="Model to compare with (default: the one the store was made with)."),
    verify: bool = typer.Option(False, help="Re-hash every file instead of trusting unchanged size and mtime."),
) -> None:
    """Print what an encode would do (new / changed / removed / unchanged); exit 1 when the store is stale."""
    plan = plan_against_store(dataset, store, model, verify)
    counts = {k: len(v) for k, v in plan.changes.items()}
    typer.echo(" ".join(f"{k} {counts[k]}" for k in ("new", "changed", "removed", "unchanged"))
               + f"; to encode: {len(plan.video_jobs)} clips, {len(plan.text_jobs)} captions; bad items {len(plan.bad)}")
    for kind in ("new", "changed", "removed"):
        for source in plan.changes[kind][:20]:
            typer.echo(f"  {kind}: {source}")
    if plan.stale or plan.video_jobs or plan.text_jobs:
        typer.echo("store is stale: run cogprep encode")
        raise typer.Exit(1)
    typer.echo("store is current")


def plan_against_store(dataset: Path, store: Path, model: str | None = None, verify: bool = False):
    """Plan an encode of `dataset` with the settings recorded in `store` (what `status` and cogtrain check)."""
    manifest = S.Manifest.load(store)
    m = open_model(model or manifest.model["source"], PREP_COMPONENTS)
    info = manifest.dataset
    data = read_dataset(dataset, info.get("layout"), caption_column=info.get("caption_column"),
                        video_column=info.get("video_column"), id_token=info.get("id_token"))
    st = dict(manifest.settings)
    settings = EncodeSettings(**{**st, "sampling": FrameSampling(**st["sampling"])})
    hashes = FileHashes(Path(store) / CACHE_DIR / "files.json", verify=verify)
    vae_fp, text_fp, _ = model_fingerprints(m, hashes)
    return plan_encode(data, spec_from_json(st["buckets"]), settings, vae_fp, text_fp, Path(store), hashes)


def main() -> None:
    app()
