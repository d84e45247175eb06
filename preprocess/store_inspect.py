"""`cogprep inspect`: what a store holds, and a contact sheet of its samples' first frames (`--preview`).

The sheet's frames are decoded from the cached latents by `compute.decode_first_frames`; this module lays them
out.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont

from ..shared import store as S
from ..shared.atomic import atomic_path
from ..shared.disk import human_bytes
from ..shared.errors import CogtuneError
from ..shared.fingerprint import model_file_hashes
from ..shared.models import open_model
from .plan import CACHE_DIR
from .store_gc import plan_gc

log = logging.getLogger(__name__)


def load_report(store: Path) -> dict[str, Any] | None:
    path = Path(store) / S.REPORT
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise CogtuneError(f"{path}: not valid JSON ({e})") from None


def preview_rows(rows: list[dict[str, Any]], max_samples: int) -> list[dict[str, Any]]:
    """The samples a preview shows: in dataset-source order (the index is in key order, which means nothing)."""
    return sorted(rows, key=lambda r: (r["source"], r["clip_start"], r["bucket"]))[:max_samples]


TILE = 256
"""Preview cells are TILE pixels square for the picture (fitted within PAD, aspect kept), plus the label strip."""
PAD = 4
LABEL_LINES = 3
LINE_HEIGHT = 12
LABEL_HEIGHT = LABEL_LINES * LINE_HEIGHT + 6
BACKGROUND = (24, 24, 24)


def sheet_grid(count: int) -> tuple[int, int]:
    """(columns, rows) of a contact sheet of `count` tiles: as square as it gets."""
    columns = max(1, math.ceil(math.sqrt(count)))
    return columns, max(1, math.ceil(count / columns))


def contact_sheet(frames: list[np.ndarray], labels: list[tuple[str, str]]) -> Image.Image:
    """A PIL image: one cell per frame, the frame fitted into TILE x TILE, its bucket and caption below."""
    columns, rows = sheet_grid(len(frames))
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + LABEL_HEIGHT)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (frame, (bucket, caption)) in enumerate(zip(frames, labels)):
        x, y = (i % columns) * TILE, (i // columns) * (TILE + LABEL_HEIGHT)
        image = Image.fromarray(frame)
        scale = min((TILE - 2 * PAD) / image.width, (TILE - 2 * PAD) / image.height)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        # Tiny frames are blown up with NEAREST so every latent-decoded pixel stays visible as it is.
        image = image.resize(size, Image.NEAREST if scale >= 1 else Image.BICUBIC)
        sheet.paste(image, (x + (TILE - size[0]) // 2, y + (TILE - size[1]) // 2))
        lines = [bucket] + _wrap(draw, caption, font, TILE - 2 * PAD, LABEL_LINES - 1)
        for n, text in enumerate(lines):
            draw.text((x + PAD, y + TILE + 3 + n * LINE_HEIGHT), text, fill=(235, 235, 235), font=font)
    return sheet


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap into at most `max_lines`, the last one cut with an ellipsis when the text goes on."""
    lines: list[str] = []
    words = text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line += " " + words.pop(0)
        lines.append(line)
    if words or (lines and draw.textlength(lines[-1], font=font) > width):
        last = lines[-1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        image.save(tmp, format="PNG")


SUMMARY_COLUMNS = ("bucket", "video_key", "kind", "source", "text_key")
"""The index columns the bucket and sample tables count: read alone, and counted by Arrow, with no Python object
per row (a million row dicts took a minute)."""


def inspect_tables(store: Path, manifest: S.Manifest) -> list:
    index = S.read_index_table(store, SUMMARY_COLUMNS)
    if index is None:
        index = S.INDEX_SCHEMA.empty_table().select(SUMMARY_COLUMNS)
    return [_bucket_table(store, manifest, index), _kind_table(index), _disk_table(store), _about_table(store, manifest)]


def _bucket_table(store: Path, manifest: S.Manifest, index: pa.Table):
    batch_sizes = {b["name"]: b["batch_size"] for b in manifest.buckets}
    per_bucket = index.group_by("bucket").aggregate([("bucket", "count"), ("video_key", "count_distinct")])
    table = _table(f"buckets of {store}", ["bucket", "samples", "batch size", "clips"])
    for row in sorted(per_bucket.to_pylist(), key=lambda r: r["bucket"]):
        name = row["bucket"]
        table.add_row(name, str(row["bucket_count"]), str(batch_sizes.get(name, "?")),
                      str(row["video_key_count_distinct"]))
    table.add_row("[b]total[/b]", f"[b]{index.num_rows}[/b]", "", str(_distinct(index["video_key"])))
    return table


def _kind_table(index: pa.Table):
    table = _table("samples", ["what", "count"])
    kinds = pc.value_counts(index["kind"]).to_pylist()
    for kind, n in sorted((k["values"], k["counts"]) for k in kinds):
        table.add_row(f"{kind} samples", str(n))
    table.add_row("sources", str(_distinct(index["source"])))
    table.add_row("captions", str(_distinct(index["text_key"])))
    return table


def _distinct(column: pa.ChunkedArray) -> int:
    return pc.count_distinct(column).as_py()


def _disk_table(store: Path):
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


def write_preview(store: Path, manifest: S.Manifest, rows: list[dict[str, Any]], out: Path, model: str | None,
                  max_samples: int) -> None:
    from .compute import decode_first_frames, preview_vae

    shown = preview_rows(rows, max_samples)
    if not shown:
        raise CogtuneError(f"{Path(store) / S.INDEX}: no samples to preview")
    m = open_model(model or manifest.model["source"], ("vae",))
    hashes = model_file_hashes(Path(store) / CACHE_DIR)
    if m.fingerprint(("vae",), hashes)["vae"] != manifest.model.get("fingerprints", {}).get("vae"):
        log.warning("%s is not the VAE the store was encoded with: the preview will not show the videos",
                    m.path / "vae")
    for row in shown:
        log.debug("preview: %s (%s, caption %r)", row["source"], row["bucket"], row["caption"])
    frames = decode_first_frames(store, shown, preview_vae(m))
    save_png(contact_sheet(frames, [(r["bucket"], r["caption"]) for r in shown]), out)
    log.info("preview of %d samples: %s", len(shown), out)
