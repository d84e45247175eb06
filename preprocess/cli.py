"""cogprep: encode a video dataset once into a bucketed, content-keyed store for cogtrain."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Optional

import typer

from ..shared import store as S
from ..shared.buckets import (
    BucketSpec,
    bucket_spec_from_resolution,
    check_buckets_for_model,
    load_bucket_spec,
)
from ..shared.cli import make_app, quiet_hub_progress_bars, wide_console
from ..shared.config import config_option
from ..shared.disk import human_bytes
from ..shared.errors import CogtuneError, exit_on_user_error
from ..shared.fingerprint import FileHashes
from ..shared.models import Model, open_model
from .datasets import read_dataset
from .encode import (
    PREP_COMPONENTS,
    RunOptions,
    model_fingerprints,
    run_encode,
)
from .frames import FrameSampling
from .plan import CACHE_DIR, EncodeSettings, plan_against_store, skip_kind

app = make_app(
    "cogprep",
    "Encode a video dataset once (VAE latents, T5 embeddings, I2V first frames) into a bucketed store that "
    "cogtrain reads; re-running after a dataset edit encodes only what changed.",
)


def sampling_fps(fps: str | None, model: Model) -> float | None:
    """--fps as FrameSampling takes it: the model's rate by default, None for 'source', else the number given.

    49 frames of a 30 fps clip cover 1.6 s where CogVideoX-5b was trained on 6.1 s at 8 fps: trained at the
    source's rate, a LoRA learns slow motion, which the pipelines' 8 (or 16) fps export plays slower still."""
    if fps is None:
        return float(model.variant.fps)
    if fps == "source":
        return None
    try:
        value = float(fps)
    except ValueError:
        raise CogtuneError(f"--fps {fps!r}: give a frame rate, or 'source' to keep each video's own") from None
    if not value > 0:
        raise CogtuneError(f"--fps {fps}: must be positive")
    return value


def _bucket_spec(model: Model, resolution: str | None, buckets: Path | None) -> BucketSpec:
    if resolution and buckets:
        raise CogtuneError("give --resolution or --buckets, not both")
    if buckets is not None:
        spec = load_bucket_spec(buckets, model.variant)
    else:
        f, h, w = model.native_size()
        spec = bucket_spec_from_resolution(resolution or f"{f}x{h}x{w}", model.variant)
    check_buckets_for_model(spec, model)
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
    fps: Optional[str] = typer.Option(None, help="Frame rate clips are sampled at: N, or 'source' to keep each "
                                      "video's own (default: the model's, 8 for CogVideoX 1.0 and 16 for 1.5, the rate "
                                      "it was trained at and its pipelines export at)."),
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
    shard_max_items: int = typer.Option(1000, min=1, help="Items per shard before a new shard is started."),
    workers: int = typer.Option(2, help="CPU processes decoding and resizing clips while the model encodes."),
    device: str = typer.Option("auto", help="auto (cuda:LOCAL_RANK if present, else cpu), cpu, cuda, cuda:1, ..."),
    strict: bool = typer.Option(False, help="Any bad item: exit 2 and write nothing."),
    rehash: bool = typer.Option(False, help="Re-hash every source file instead of trusting unchanged size and mtime."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    config: Optional[Path] = config_option(),
) -> None:
    """Encode DATASET into the store OUT (only what is new or changed when OUT exists)."""
    if not progress:
        quiet_hub_progress_bars()
    m = open_model(model, PREP_COMPONENTS)
    spec = _bucket_spec(m, resolution, buckets)
    data = read_dataset(dataset, layout, caption_column=caption_column, video_column=video_column, id_token=id_token)
    settings = EncodeSettings(
        buckets=spec.to_json(),
        sampling=FrameSampling(fps=sampling_fps(fps, m), stride=stride, skip_start=skip_start, skip_end=skip_end,
                               clips=clips),
        resize=resize,
        dtype=dtype,
        image_noise_variants=image_noise_variants if m.variant.task == "i2v" else 0,
        seed=seed,
        text_length=m.config("transformer").get("max_text_seq_length", m.variant.text_length),
    )
    if resize not in ("crop", "stretch"):
        raise CogtuneError(f"--resize {resize!r}: choose crop or stretch")
    options = RunOptions(device=device, workers=workers, text_batch_size=text_batch_size, vae_tiling=vae_tiling,
                         vae_slicing=vae_slicing, strict=strict, rehash=rehash, shard_max_items=shard_max_items,
                         validation_prompts=validation_prompts, validation_images=validation_images,
                         progress=progress)
    info = {"path": str(Path(dataset).resolve()), "layout": data.layout, "file": str(data.file),
            "caption_column": caption_column, "video_column": video_column, "id_token": id_token}
    result = run_encode(data, m, out, spec, settings, options, info)
    from .encode import dist_info

    if dist_info()[0] == 0:
        _print_summary(out, result)


def _print_summary(store: Path, result) -> None:
    from rich.table import Table

    console = wide_console()
    rows = S.read_index(store)
    table = Table(title=f"cogprep: {store}")
    table.add_column("bucket")
    table.add_column("samples", justify="right")
    for name, n in sorted(Counter(r["bucket"] for r in rows).items()):
        table.add_row(name, str(n))
    table.add_row("[b]total[/b]", f"[b]{len(rows)}[/b]")
    console.print(table)
    changes = {k: len(v) for k, v in result.plan.changes.items()}
    # soft_wrap: a summary line stays one line, in a terminal and in a log file alike
    console.print(f"encoded {result.encoded_videos} clips and {result.encoded_texts} captions "
                  f"(sources new {changes['new']}, changed {changes['changed']}, removed {changes['removed']}, "
                  f"unchanged {changes['unchanged']}); {human_bytes(S.disk_bytes(store))} on disk; "
                  f"{result.seconds:.1f} s", soft_wrap=True)
    if result.skipped:
        kinds = Counter(skip_kind(b.reason) for b in result.skipped)
        console.print(f"skipped {len(result.skipped)}: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common())
                      + f" (details in {Path(store) / S.REPORT})", soft_wrap=True, markup=False, highlight=False)


@app.command()
@exit_on_user_error
def status(
    dataset: Path = typer.Argument(..., help="The dataset folder or file the store was encoded from."),
    store: Path = typer.Option(..., "--store", help="The store to compare with."),
    model: Optional[str] = typer.Option(None, help="Model to compare with (default: the one the store was made with)."),
    rehash: bool = typer.Option(False, help="Re-hash every source file instead of trusting unchanged size and mtime."),
) -> None:
    """Print what an encode would do (new / changed / removed / unchanged); exit 1 when the store is stale."""
    hashes = FileHashes(Path(store) / CACHE_DIR / "files.json", rehash=rehash)
    manifest = S.Manifest.load(store)
    m = open_model(model or manifest.model["path"], PREP_COMPONENTS)
    # a store an older cogtune made at a size this model cannot train at: an encode would refuse its buckets
    check_buckets_for_model(BucketSpec.from_json(manifest.settings["buckets"]), m, where=str(store))
    plan = plan_against_store(dataset, store, model_fingerprints(m, hashes)[2], hashes)
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


@app.command()
@exit_on_user_error
def verify(
    store: Path = typer.Argument(..., help="The store to check."),
    workers: int = typer.Option(0, help="Shards read at once (0: one per core, at most 8)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Read back every cached member the index points at (sizes, gzip CRC, safetensors, shapes and dtypes);
    list the damaged samples, record them for the next cogprep encode to re-encode, exit 1 if any."""
    from .verify import record_damage, verify_store

    with S.store_lock(store):
        result = verify_store(store, workers=workers, progress=progress)
        record_damage(store, result)
    for sample in result.damaged_samples:
        typer.echo(f"damaged: {sample['source']} ({sample['bucket']}, caption {sample['caption']!r}): "
                   f"{sample['problem']}")
    summary = (f"{store}: checked {result.members} members ({human_bytes(result.bytes_read)}); "
               f"{len(result.damaged_samples)} damaged samples")
    if result.damaged_samples:
        typer.echo(f"{summary}: recorded in {S.DAMAGED}; cogprep encode re-encodes them from their sources")
        raise typer.Exit(1)
    typer.echo(summary)


@app.command("gc")
@exit_on_user_error
def gc_store(
    store: Path = typer.Argument(..., help="The store to clean up."),
    dry_run: bool = typer.Option(False, help="Print what gc would do and change nothing."),
) -> None:
    """Reclaim the space of dead items (old versions after edits, killed runs' leftovers); live items are copied,
    never re-encoded. Run it when no encode is writing to STORE."""
    from .maintain import plan_gc, run_gc

    if dry_run:  # reads only: no lock, so it writes nothing at all
        plan = plan_gc(store)
        _print_gc_plan(store, plan, "would ")
        typer.echo(f"would reclaim about {human_bytes(plan.dead_bytes(store))} of {human_bytes(S.disk_bytes(store))}")
        return
    with S.store_lock(store):
        plan = plan_gc(store)
        before = S.disk_bytes(store)
        _print_gc_plan(store, plan, "")
        copied = run_gc(store, plan)
        after = S.disk_bytes(store)
    typer.echo(f"copied {copied} live items; bytes before {before} ({human_bytes(before)}), after {after} "
               f"({human_bytes(after)}), reclaimed {before - after} ({human_bytes(before - after)})")


def _print_gc_plan(store: Path, plan, would: str) -> None:
    if plan.empty:
        typer.echo(f"{store}: nothing to reclaim ({len(plan.keep)} shards, every item live)")
        return
    typer.echo(f"{would}keep {len(plan.keep)} shards whose items are all live")
    for use in plan.rewrite:
        typer.echo(f"{would}rewrite {use.shard}: {len(use.live)} of {len(use.items)} items live")
    for shard in plan.delete:
        typer.echo(f"{would}delete {shard}: no live item")
    for path in plan.temp_files:
        typer.echo(f"{would}delete {path.relative_to(store).as_posix()}: left by a killed run")


@app.command("inspect")
@exit_on_user_error
def inspect_store(
    store: Path = typer.Argument(..., help="The store to describe."),
    preview: Optional[Path] = typer.Option(None, help="Write a PNG contact sheet of each sample's first frame, "
                                           "decoded from the cached latents."),
    model: Optional[str] = typer.Option(None, help="Model whose VAE decodes the preview (default: the store's)."),
    max_samples: int = typer.Option(16, help="Samples on the preview."),
) -> None:
    """Print what STORE holds: buckets, sample kinds, bytes on disk, model, encode settings, dataset, last report."""
    manifest = S.Manifest.load(store)
    rows = S.read_index(store)
    console = wide_console()
    for table in _inspect_tables(store, manifest, rows):
        console.print(table)
    if preview is not None:
        _write_preview(store, manifest, rows, preview, model, max_samples, console)


def _inspect_tables(store: Path, manifest: S.Manifest, rows: list[dict[str, Any]]) -> list:
    return [_bucket_table(store, manifest, rows), _kind_table(rows), _disk_table(store), _about_table(store, manifest)]


def _bucket_table(store: Path, manifest: S.Manifest, rows: list[dict[str, Any]]):
    batch_sizes = {b["name"]: b["batch_size"] for b in manifest.buckets}
    samples = Counter(r["bucket"] for r in rows)
    table = _table(f"buckets of {store}", ["bucket", "samples", "batch size", "clips"])
    for name in sorted(samples):
        clips = len({r["video_key"] for r in rows if r["bucket"] == name})
        table.add_row(name, str(samples[name]), str(batch_sizes.get(name, "?")), str(clips))
    table.add_row("[b]total[/b]", f"[b]{len(rows)}[/b]", "", str(len({r["video_key"] for r in rows})))
    return table


def _kind_table(rows: list[dict[str, Any]]):
    table = _table("samples", ["what", "count"])
    for kind, n in sorted(Counter(r["kind"] for r in rows).items()):
        table.add_row(f"{kind} samples", str(n))
    table.add_row("sources", str(len({r["source"] for r in rows})))
    table.add_row("captions", str(len({r["text_key"] for r in rows})))
    return table


def _disk_table(store: Path):
    from .maintain import plan_gc

    table = _table("bytes on disk", ["part", "bytes", "size"])
    parts = S.bytes_by_part(store)
    for part, n in sorted(parts.items()):
        table.add_row(part, str(n), human_bytes(n))
    table.add_row("[b]total[/b]", str(sum(parts.values())), human_bytes(sum(parts.values())))
    try:
        dead = plan_gc(store).dead_bytes(store)
        table.add_row("reclaimable by cogprep gc", f"~{dead}", human_bytes(dead))
    except CogtuneError as e:  # a damaged store is still worth describing
        table.add_row("reclaimable by cogprep gc", "unknown", str(e))
    return table


def _about_table(store: Path, manifest: S.Manifest):
    import json

    from .maintain import load_report

    table = _table("model, settings, dataset", ["", ""])
    table.add_row("model", str(manifest.model.get("source")))
    table.add_row("variant", str(manifest.model.get("variant")))
    for component, fingerprint in sorted(manifest.model.get("fingerprints", {}).items()):
        table.add_row(f"fingerprint {component}", fingerprint)
    for package, version in sorted(manifest.software.items()):
        table.add_row(f"encoded with {package}", version)
    for key, value in sorted(manifest.settings.items()):
        table.add_row(f"setting {key}", value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    for key, value in sorted(manifest.dataset.items()):
        if value is not None:
            table.add_row(f"dataset {key}", str(value))
    report = load_report(store)
    if report is None:
        table.add_row("last encode", "no report.json")
    else:
        table.add_row("last encode", f"{report['encoded']['videos']} clips and {report['encoded']['texts']} "
                                     f"captions encoded in {report['seconds']} s")
        table.add_row("skipped", f"{len(report['skipped'])} (details in {Path(store) / S.REPORT})")
    return table


NUMERIC_COLUMNS = ("samples", "batch size", "clips", "count", "bytes")


def _table(title: str, columns: list[str]):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for name in columns:
        table.add_column(name, justify="right" if name in NUMERIC_COLUMNS else "left", overflow="fold")
    return table


def _write_preview(store: Path, manifest: S.Manifest, rows: list[dict[str, Any]], out: Path, model: str | None,
                   max_samples: int, console) -> None:
    from .maintain import (
        contact_sheet,
        decode_first_frames,
        preview_rows,
        preview_vae,
        save_png,
    )

    shown = preview_rows(rows, max_samples)
    if not shown:
        raise CogtuneError(f"{Path(store) / S.INDEX}: no samples to preview")
    m = open_model(model or manifest.model["source"], ("vae",))
    hashes = FileHashes(Path(store) / CACHE_DIR / "files.json")
    if m.fingerprint(("vae",), hashes)["vae"] != manifest.model.get("fingerprints", {}).get("vae"):
        console.print(f"[yellow]warning[/yellow]: {m.path / 'vae'} is not the VAE the store was encoded with: "
                      "the preview will not show the videos")
    frames = decode_first_frames(store, shown, preview_vae(m))
    save_png(contact_sheet(frames, [(r["bucket"], r["caption"]) for r in shown]), out)
    console.print(f"preview of {len(shown)} samples: {out}")


@app.command("extract-frames")
@exit_on_user_error
def extract_frames(
    dataset: Path = typer.Argument(..., help="A txt dataset folder (prompts.txt + videos.txt)."),
    out_dir: str = typer.Option("images", help="Folder for the PNGs, relative to DATASET."),
    overwrite: bool = typer.Option(False, help="Replace an existing images.txt and PNGs."),
) -> None:
    """Write the first frame of each video to OUT_DIR/<stem>.png and list them in DATASET/images.txt (I2V)."""
    from .maintain import extract_first_frames

    result = extract_first_frames(dataset, out_dir, overwrite)
    typer.echo(f"wrote {result.written} first frames to {Path(dataset) / out_dir} and {result.images_file}")
    for bad in result.bad:
        typer.echo(f"  no image: {bad.reason}")
    if result.bad:
        typer.echo(f"{len(result.bad)} videos have no image: their images.txt lines are empty, and encode reports "
                   "them as bad items")


def main() -> None:
    app()


if __name__ == "__main__":  # python -m cogtune.preprocess.cli, e.g. under torchrun
    main()
