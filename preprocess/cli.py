"""cogprep: encode a video dataset once into a bucketed, content-keyed store for cogtrain.

What a command does is said through the logger (`shared.log`: ``cogprep: `` lines, rank 0 alone under a
launcher, ``--quiet`` and ``--verbose``); what a command exists to print (inspect's tables, status's verdict,
verify's damaged samples, gc --dry-run's plan) is its output, printed plainly at any verbosity.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import Callable
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
from ..shared.cli import bitsandbytes_hidden, make_app, quiet_hub_progress_bars, wide_console
from ..shared.disk import human_bytes
from ..shared.errors import CogtuneError, exit_on_user_error
from ..shared.fingerprint import FileHashes, dataset_file_hashes, model_file_hashes
from ..shared.log import setup_logging, shown, verbosity
from ..shared.models import Model, open_model
from .datasets import read_dataset
from .encode import PREP_COMPONENTS, model_fingerprints, run_encode
from .options import EncodeRequest, encode_parameters, quiet_option, sampling_fps, verbose_option
from .plan import CACHE_DIR, EncodeSettings, skip_kind
from .staleness import store_changes

app = make_app(
    "cogprep",
    "Encode a video dataset once (VAE latents, T5 embeddings, I2V first frames) into a bucketed store that "
    "cogtrain reads; re-running after a dataset edit encodes only what changed.",
)
log = logging.getLogger("cogtune.preprocess.cli")  # not __name__, which is __main__ under python -m
STATUS_LISTED = 20
"""Sources of each kind (new, changed, removed) cogprep status lists; --verbose lists them all."""


def _start_logging(quiet: bool, verbose: bool) -> None:
    setup_logging("cogprep", verbosity(quiet, verbose))


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
    _start_logging(values.pop("quiet"), values.pop("verbose"))
    request = EncodeRequest.from_options(values)
    inputs = request.inputs
    run = replace(request.run, progress=request.run.progress and shown())  # bars: rank 0, not --quiet
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
    with bitsandbytes_hidden():  # diffusers' and transformers' model code would import it for nothing
        result = run_encode(data, m, inputs.out, spec, settings, run, info)
    if shown():  # the other ranks have nothing to count: rank 0 committed every rank's work
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
    log.info("encoded %d clips and %d captions (sources new %d, changed %d, removed %d, unchanged %d); %s on disk; "
             "%.1f s", result.encoded_videos, result.encoded_texts, changes["new"], changes["changed"],
             changes["removed"], changes["unchanged"], human_bytes(S.disk_bytes(store)), result.seconds)
    if result.skipped:
        kinds = Counter(skip_kind(b.reason) for b in result.skipped)
        log.info("skipped %d: %s (details in %s)", len(result.skipped),
                 ", ".join(f"{k} {n}" for k, n in kinds.most_common()), Path(store) / S.REPORT)
        for bad in result.skipped:
            log.debug("skipped item: %s", bad.reason)


@app.command(short_help="What an encode would do; exit 1 when the store is stale.")
@exit_on_user_error
def status(
    dataset: Path = typer.Argument(..., metavar="DATASET",
                                   help="The dataset folder or file the store was encoded from."),
    store: Path = typer.Option(..., "--store", help="The store folder to compare with."),
    model: Optional[str] = typer.Option(None, help="Model to compare with (default: the one the store was made with)."),
    rehash: bool = typer.Option(False, help="Re-hash every source file instead of trusting unchanged size and mtime."),
    quiet: bool = quiet_option("the verdict alone, no counts or sources"),
    verbose: bool = verbose_option(f"list every new, changed and removed source, not the first {STATUS_LISTED}"),
) -> None:
    """Print what an encode would do (new / changed / removed / unchanged); exit 1 when the store is stale."""
    _start_logging(quiet, verbose)
    model_hashes = model_file_hashes(Path(store) / CACHE_DIR, rehash=rehash)
    manifest = S.Manifest.load(store)
    m = open_model(model or manifest.model["path"], PREP_COMPONENTS)
    # a store an older cogtune made at a size this model cannot train at: an encode would refuse its buckets
    check_buckets_for_model(BucketSpec.from_json(manifest.settings["buckets"]), m, where=str(store))
    fingerprints = model_fingerprints(m, model_hashes)[2]
    _save_quietly(model_hashes)
    # by columns, no key derived where they match the index; only the sources that differ are planned
    # (see preprocess/staleness.py); the dataset's file hashes are read only if some source is planned
    found = store_changes(dataset, store, fingerprints,
                          dataset_file_hashes(Path(store) / CACHE_DIR, rehash=True) if rehash else None)
    counts = found.counts()
    log.info(" ".join(f"{k} {counts[k]}" for k in ("new", "changed", "removed", "unchanged"))
             + f"; to encode: {found.video_jobs} clips, {found.text_jobs} captions; bad items {found.bad}")
    for kind in ("new", "changed", "removed"):
        for i, source in enumerate(found.changes[kind]):
            log.log(logging.INFO if i < STATUS_LISTED else logging.DEBUG, "%s: %s", kind, source)
    if found.stale or found.video_jobs or found.text_jobs:
        typer.echo("store is stale: run cogprep encode")
        raise typer.Exit(1)
    typer.echo("store is current")


def _save_quietly(hashes: FileHashes) -> None:
    """Keep the hashes status found (a store from before the model files had their own cache: next time it reads
    that small cache alone); a store status may not write to is only read, as before."""
    try:
        hashes.save()
    except OSError as e:
        log.debug("%s: not written (%s)", hashes.cache_path, e.strerror)


@app.command(short_help="Read back every cached member; record the damaged ones.")
@exit_on_user_error
def verify(
    store: Path = typer.Argument(..., metavar="STORE", help="The store folder to check."),
    workers: int = typer.Option(0, help="Threads reading and checking members at once (0: one per core)."),
    deep: bool = typer.Option(False, help="Inflate every member in full (gzip's CRC, the whole safetensors file), even those whose stored bytes' CRC-32 the index records: bound by the CPU, about 100 MB/s a core, where the CRC check reads at the disk's speed."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    quiet: bool = quiet_option("the damaged samples alone, no bar or summary line"),
    verbose: bool = verbose_option("also each damaged item's key (what re-encoding replaces) and problem"),
) -> None:
    """Read back every cached member the index points at (sizes; the CRC-32 of the stored bytes the index
    records, or where it records none the gzip CRC of the inflated ones; safetensors headers, shapes and dtypes);
    list the damaged samples, record them for the next cogprep encode to re-encode, exit 1 if any."""
    from .verify import record_damage, verify_store

    _start_logging(quiet, verbose)
    with S.store_lock(store):
        result = verify_store(store, workers=workers, progress=progress and shown(), deep=deep)
        record_damage(store, result)
    for item, problem in result.damaged_items.items():
        log.debug("damaged item %s: %s", item, problem)
    for sample in result.damaged_samples:
        typer.echo(f"damaged: {sample['source']} ({sample['bucket']}, caption {sample['caption']!r}): "
                   f"{sample['problem']}")
    inflated = f", {result.inflated} inflated in full" if result.inflated else ""  # no CRC recorded, or --deep
    summary = (f"{store}: checked {result.members} members ({human_bytes(result.bytes_read)}{inflated}); "
               f"{len(result.damaged_samples)} damaged samples")
    if result.damaged_samples:
        log.info("%s: recorded in %s; cogprep encode re-encodes them from their sources", summary, S.DAMAGED)
        raise typer.Exit(1)
    log.info("%s", summary)


@app.command("gc", short_help="Reclaim the space of dead items (live ones are copied).")
@exit_on_user_error
def gc_store(
    store: Path = typer.Argument(..., metavar="STORE", help="The store folder to clean up."),
    dry_run: bool = typer.Option(False, help="Print what gc would do and change nothing."),
    quiet: bool = quiet_option("no plan or summary line (--dry-run still prints its plan)"),
    verbose: bool = verbose_option("also each shard kept as it is"),
) -> None:
    """Reclaim the space of dead items (old versions after edits, killed runs' leftovers); live items are copied,
    never re-encoded. Run it when no encode is writing to STORE."""
    from .store_gc import plan_gc, run_gc

    _start_logging(quiet, verbose)
    if dry_run:  # reads only: no lock, so it writes nothing at all; the plan is what --dry-run is for
        plan = plan_gc(store)
        _print_gc_plan(store, plan, "would ", typer.echo)
        typer.echo(f"would reclaim about {human_bytes(plan.dead_bytes(store))} of {human_bytes(S.disk_bytes(store))}")
        return
    with S.store_lock(store):
        plan = plan_gc(store)
        before = S.disk_bytes(store)
        _print_gc_plan(store, plan, "", log.info)
        copied = run_gc(store, plan)
        after = S.disk_bytes(store)
    log.info("copied %d live items; bytes before %d (%s), after %d (%s), reclaimed %d (%s)", copied, before,
             human_bytes(before), after, human_bytes(after), before - after, human_bytes(before - after))


def _print_gc_plan(store: Path, plan, would: str, say: Callable[[str], None]) -> None:
    """Say `plan` through `say`: the log's info lines, or plain output for --dry-run, whose output it is."""
    for use in plan.keep:
        log.debug("%skeep %s: %d items, all live", would, use.shard, len(use.items))
    if plan.empty:
        say(f"{store}: nothing to reclaim ({len(plan.keep)} shards, every item live)")
        return
    say(f"{would}keep {len(plan.keep)} shards whose items are all live")
    for use in plan.rewrite:
        say(f"{would}rewrite {use.shard}: {len(use.live)} of {len(use.items)} items live")
    for shard in plan.delete:
        say(f"{would}delete {shard}: no live item")
    for path in plan.temp_files:
        say(f"{would}delete {path.relative_to(store).as_posix()}: left by a killed run")


@app.command("inspect", short_help="Print what STORE holds; --preview draws first frames.")
@exit_on_user_error
def inspect_store(
    store: Path = typer.Argument(..., metavar="STORE", help="The store folder to describe."),
    preview: Optional[Path] = typer.Option(None, help="Write a PNG contact sheet of each sample's first frame, "
                                           "decoded from the cached latents."),
    model: Optional[str] = typer.Option(None, help="Model whose VAE decodes the preview (default: the store's)."),
    max_samples: int = typer.Option(16, help="Samples on the preview."),
    quiet: bool = quiet_option("the tables alone, no line about the preview written"),
    verbose: bool = verbose_option("also each sample drawn on the preview"),
) -> None:
    """Print what STORE holds: buckets, sample kinds, bytes on disk, model, encode settings, dataset, last report."""
    _start_logging(quiet, verbose)
    if preview is not None and preview.is_dir():
        raise CogtuneError(f"{preview}: a folder: --preview takes the PNG file to write")
    from .store_inspect import inspect_tables, write_preview

    manifest = S.Manifest.load(store)
    console = wide_console()
    for table in inspect_tables(store, manifest):
        console.print(table)
    if preview is not None:
        write_preview(store, manifest, S.read_index(store), preview, model, max_samples)


@app.command("extract-frames", short_help="First frame of each video to a PNG, listed in images.txt.")
@exit_on_user_error
def extract_frames(
    dataset: Path = typer.Argument(..., metavar="DATASET", help="A txt dataset folder (prompts.txt + videos.txt)."),
    out_dir: str = typer.Option("images", help="Folder for the PNGs, relative to DATASET."),
    overwrite: bool = typer.Option(False, help="Replace an existing images.txt and PNGs."),
    quiet: bool = quiet_option("no line of the frames written (videos without an image are still named)"),
    verbose: bool = verbose_option("also each PNG written"),
) -> None:
    """Write the first frame of each video to OUT_DIR/<stem>.png and list them in DATASET/images.txt (I2V)."""
    from .extract_frames import extract_first_frames

    _start_logging(quiet, verbose)
    result = extract_first_frames(dataset, out_dir, overwrite)
    log.info("wrote %d first frames to %s and %s", result.written, Path(dataset) / out_dir, result.images_file)
    for bad in result.bad:
        log.warning("no image: %s", bad.reason)
    if result.bad:
        log.warning("%d videos have no image: their images.txt lines are empty, and encode reports them as bad "
                    "items", len(result.bad))


def main() -> None:
    app()


if __name__ == "__main__":  # python -m cogtune.preprocess.cli, e.g. under torchrun
    main()
