"""cogprep: encode a video dataset once into a bucketed, content-keyed store for cogtrain."""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import replace
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
from ..shared.disk import human_bytes
from ..shared.errors import CogtuneError, exit_on_user_error
from ..shared.fingerprint import FileHashes
from ..shared.models import Model, open_model
from .datasets import read_dataset
from .encode import PREP_COMPONENTS, dist_info, model_fingerprints, run_encode
from .options import EncodeRequest, encode_parameters, sampling_fps
from .plan import CACHE_DIR, EncodeSettings, plan_against_store, skip_kind
from .staleness import current_by_columns

app = make_app(
    "cogprep",
    "Encode a video dataset once (VAE latents, T5 embeddings, I2V first frames) into a bucketed store that "
    "cogtrain reads; re-running after a dataset edit encodes only what changed.",
)


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


@exit_on_user_error
def encode(**values: Any) -> None:
    """Encode DATASET into the store OUT (only what is new or changed when OUT exists)."""
    values.pop("config")
    request = EncodeRequest.from_options(values)
    inputs, run = request.inputs, request.run
    if not run.progress:
        quiet_hub_progress_bars()
    request.check_out()
    m = open_model(inputs.model, PREP_COMPONENTS)
    spec = _bucket_spec(m, inputs.resolution, inputs.buckets)
    data = read_dataset(request.dataset, inputs.layout, caption_column=inputs.caption_column,
                        video_column=inputs.video_column, id_token=inputs.id_token)
    settings = EncodeSettings(
        **{**request.settings, **({} if m.variant.task == "i2v" else {"image_noise_variants": 0})},
        buckets=spec.to_json(),
        sampling=replace(request.sampling, fps=sampling_fps(inputs.fps, m)),
        text_length=m.config("transformer").get("max_text_seq_length", m.variant.text_length),
    )
    info = {"path": str(request.dataset.resolve()), "layout": data.layout, "file": str(data.file),
            "caption_column": inputs.caption_column, "video_column": inputs.video_column, "id_token": inputs.id_token}
    result = run_encode(data, m, inputs.out, spec, settings, run, info)
    if dist_info()[0] == 0:
        _print_summary(inputs.out, result)


encode.__signature__ = inspect.Signature(encode_parameters())  # type: ignore[attr-defined]
app.command(short_help="Encode DATASET into the store OUT (new or changed only).")(encode)


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


@app.command(short_help="What an encode would do; exit 1 when the store is stale.")
@exit_on_user_error
def status(
    dataset: Path = typer.Argument(..., metavar="DATASET",
                                   help="The dataset folder or file the store was encoded from."),
    store: Path = typer.Option(..., "--store", help="The store folder to compare with."),
    model: Optional[str] = typer.Option(None, help="Model to compare with (default: the one the store was made with)."),
    rehash: bool = typer.Option(False, help="Re-hash every source file instead of trusting unchanged size and mtime."),
) -> None:
    """Print what an encode would do (new / changed / removed / unchanged); exit 1 when the store is stale."""
    hashes = FileHashes(Path(store) / CACHE_DIR / "files.json", rehash=rehash)
    manifest = S.Manifest.load(store)
    m = open_model(model or manifest.model["path"], PREP_COMPONENTS)
    # a store an older cogtune made at a size this model cannot train at: an encode would refuse its buckets
    check_buckets_for_model(BucketSpec.from_json(manifest.settings["buckets"]), m, where=str(store))
    fingerprints = model_fingerprints(m, hashes)[2]
    # the common case, decided by columns: no key derived, no cache read (see preprocess/staleness.py)
    current = None if rehash else current_by_columns(dataset, store, fingerprints)
    if current is not None:
        typer.echo(f"new 0 changed 0 removed 0 unchanged {current.unchanged}; to encode: 0 clips, 0 captions; "
                   f"bad items {current.bad}")
        typer.echo("store is current")
        return
    plan = plan_against_store(dataset, store, fingerprints, hashes)
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


@app.command(short_help="Read back every cached member; record the damaged ones.")
@exit_on_user_error
def verify(
    store: Path = typer.Argument(..., metavar="STORE", help="The store folder to check."),
    workers: int = typer.Option(0, help="Threads reading and inflating members at once (0: one per core; inflating, not the disk, sets verify's speed)."),
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


@app.command("gc", short_help="Reclaim the space of dead items (live ones are copied).")
@exit_on_user_error
def gc_store(
    store: Path = typer.Argument(..., metavar="STORE", help="The store folder to clean up."),
    dry_run: bool = typer.Option(False, help="Print what gc would do and change nothing."),
) -> None:
    """Reclaim the space of dead items (old versions after edits, killed runs' leftovers); live items are copied,
    never re-encoded. Run it when no encode is writing to STORE."""
    from .store_gc import plan_gc, run_gc

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


@app.command("inspect", short_help="Print what STORE holds; --preview draws first frames.")
@exit_on_user_error
def inspect_store(
    store: Path = typer.Argument(..., metavar="STORE", help="The store folder to describe."),
    preview: Optional[Path] = typer.Option(None, help="Write a PNG contact sheet of each sample's first frame, "
                                           "decoded from the cached latents."),
    model: Optional[str] = typer.Option(None, help="Model whose VAE decodes the preview (default: the store's)."),
    max_samples: int = typer.Option(16, help="Samples on the preview."),
) -> None:
    """Print what STORE holds: buckets, sample kinds, bytes on disk, model, encode settings, dataset, last report."""
    if preview is not None and preview.is_dir():
        raise CogtuneError(f"{preview}: a folder: --preview takes the PNG file to write")
    from .store_inspect import inspect_tables, write_preview

    manifest = S.Manifest.load(store)
    console = wide_console()
    for table in inspect_tables(store, manifest):
        console.print(table)
    if preview is not None:
        write_preview(store, manifest, S.read_index(store), preview, model, max_samples, console)


@app.command("extract-frames", short_help="First frame of each video to a PNG, listed in images.txt.")
@exit_on_user_error
def extract_frames(
    dataset: Path = typer.Argument(..., metavar="DATASET", help="A txt dataset folder (prompts.txt + videos.txt)."),
    out_dir: str = typer.Option("images", help="Folder for the PNGs, relative to DATASET."),
    overwrite: bool = typer.Option(False, help="Replace an existing images.txt and PNGs."),
) -> None:
    """Write the first frame of each video to OUT_DIR/<stem>.png and list them in DATASET/images.txt (I2V)."""
    from .extract_frames import extract_first_frames

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
