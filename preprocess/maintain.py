"""Keeping a store and a dataset in shape: `cogprep gc`, `cogprep inspect` and `cogprep extract-frames`.

gc reclaims the space of dead items: items no index row points at (old versions after edits, a killed run's
orphans, duplicates), temp shards and a leftover ``.pending/``. A shard whose items are all live is left alone,
a shard with no live item is deleted, and a mixed shard is rewritten: its live items' bytes are copied into
new shards (nothing is re-encoded). The order makes a kill at any moment harmless:

  1. copy the live items of mixed shards into new shards, closed and fsynced;
  2. rewrite index.parquet with the new locations, atomically: the commit point;
  3. only then delete the old shards, temp shards and ``.pending/``.

Killed before 2, the new shards are orphans of the old, intact index; killed during 3, the old shards left are
orphans of the new one. The next gc deletes either. gc must not run while an encode writes to the same store:
that encode's closed shards are not in the index yet, so they would look dead.
"""

from __future__ import annotations

import json
import math
import shutil
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..shared import store as S
from ..shared.atomic import atomic_path, atomic_write_text, fsync_dir
from ..shared.errors import CogtuneError
from ..shared.models import Model
from ..shared.video import read_frames
from .datasets import (  # the txt reader's own line rules: line N here is line N there
    IMAGES_FILE,
    PROMPTS_FILE,
    VIDEOS_FILE,
    BadItem,
    read_paired_lists,
)
from .encode import PENDING, RunOptions

TAR_BLOCK = 512

# ---------------------------------------------------------------------------------------------------------
# gc


@dataclass(frozen=True)
class ShardUse:
    """One closed shard: its items, and which of them an index row points at."""

    shard: str
    size: int
    items: dict[str, dict[str, S.Location]]
    """Every item, key -> {member: Location}, in tar order."""
    live: list[str]
    """Keys of the items the index points at, in tar order."""

    @property
    def live_bytes(self) -> int:
        """Tar bytes the live items take once copied: a header block per member, data padded to blocks."""
        return sum(TAR_BLOCK + math.ceil(loc.size / TAR_BLOCK) * TAR_BLOCK
                   for key in self.live for loc in self.items[key].values())


@dataclass
class GcPlan:
    rows: list[dict[str, Any]]
    """The index as read: gc rewrites exactly these rows."""
    keep: list[ShardUse] = field(default_factory=list)
    rewrite: list[ShardUse] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    """Shards holding no live item (unreadable orphans included)."""
    temp_files: list[Path] = field(default_factory=list)
    """Half-written shards and the ``.pending/`` files of killed runs."""

    def dead_bytes(self, store: Path) -> int:
        """About what gc frees: dead shards and temp files whole, mixed shards less their live items."""
        whole = sum((store / s).stat().st_size for s in self.delete) + sum(p.stat().st_size for p in self.temp_files)
        return whole + sum(max(0, u.size - u.live_bytes) for u in self.rewrite)

    @property
    def empty(self) -> bool:
        return not (self.rewrite or self.delete or self.temp_files)


def plan_gc(store: Path) -> GcPlan:
    """Sort every shard of `store` into keep / rewrite / delete. Reads tar headers only, no member data."""
    store = Path(store)
    S.Manifest.load(store)  # refuses a folder that is not a store
    if not (store / S.INDEX).exists():
        raise CogtuneError(f"{store / S.INDEX}: missing: gc would take every item for dead; re-run cogprep encode")
    plan = GcPlan(rows=S.read_index(store))
    referenced = _referenced_locations(plan.rows)
    found: set[tuple[str, int, int]] = set()
    for shard in S.list_shards(store):
        try:
            items = S.scan_shard(store, shard)
        except (tarfile.TarError, OSError) as e:
            if any(loc[0] == shard for loc in referenced):
                problem = f"unreadable ({e}), yet the index points at it: store damaged"
                raise CogtuneError(f"{store / shard}: {problem}") from None
            plan.delete.append(shard)
            continue
        found |= {(shard, loc.offset, loc.size) for members in items.values() for loc in members.values()}
        live = [k for k, members in items.items() if any((shard, loc.offset, loc.size) in referenced
                                                         for loc in members.values())]
        use = ShardUse(shard, (store / shard).stat().st_size, items, live)
        if live and len(live) == len(items):
            plan.keep.append(use)
        elif live:
            plan.rewrite.append(use)
        else:
            plan.delete.append(shard)
    missing = sorted(referenced - found)
    if missing:
        shard, offset, _ = missing[0]
        raise CogtuneError(f"{store / S.INDEX}: points at {shard} byte {offset}, where no item is: store damaged "
                           f"({len(missing)} such members); gc refused")
    leftovers = sorted((store / S.SHARDS).glob("*/.*.tar.tmp")) + sorted((store / PENDING).rglob("*"))
    plan.temp_files = [p for p in leftovers if p.is_file()]
    return plan


def _referenced_locations(rows: list[dict[str, Any]]) -> set[tuple[str, int, int]]:
    """(shard, offset, size) of every member an index row points at."""
    out = set()
    for r in rows:
        video, text = S.row_locations(r)
        out |= {(loc.shard, loc.offset, loc.size) for loc in (*video.values(), text)}
    return out


def run_gc(store: Path, plan: GcPlan) -> int:
    """Carry out `plan` (copy, commit, delete: see the module doc); returns how many items were copied."""
    store = Path(store)
    moved = _copy_live_items(store, plan.rewrite)
    if moved:
        S.write_index(store, [_relocate(r, moved) for r in plan.rows])  # the commit point
    _delete_after_commit(store, [u.shard for u in plan.rewrite] + plan.delete, plan.temp_files)
    return sum(len(u.live) for u in plan.rewrite)


def _copy_live_items(store: Path, rewrite: list[ShardUse]) -> dict[tuple[str, int], S.Location]:
    """Copy the live items of `rewrite` into new shards of the same buckets; {(old shard, offset): new Location}."""
    prefix = f"gc-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}"
    defaults = RunOptions()  # the same shard sizes as an encode writes
    writers: dict[str, S.ShardWriter] = {}
    reader = S.ShardReader(store)
    moved: dict[tuple[str, int], S.Location] = {}
    try:
        for use in rewrite:
            bucket = PurePosixPath(use.shard).parent.name
            if bucket not in writers:
                writers[bucket] = S.ShardWriter(store, bucket, prefix, defaults.shard_max_bytes,
                                                defaults.shard_max_items)
            for key in use.live:
                members = use.items[key]
                data = {m: reader.read(loc.shard, loc.offset, loc.size) for m, loc in members.items()}
                new = writers[bucket].add(key, data)
                moved.update({(loc.shard, loc.offset): new[m] for m, loc in members.items()})
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():  # nothing points at these yet: leave no orphans behind
            w.abort()
            for shard in w.closed_shards:
                (store / shard).unlink(missing_ok=True)
        raise
    finally:
        reader.close()
    for w in writers.values():
        fsync_dir(w.folder)  # the new shards' names must be durable before the index points at them
    return moved


def _relocate(row: dict[str, Any], moved: dict[tuple[str, int], S.Location]) -> dict[str, Any]:
    """The row with its members' new locations (a video item's members move together: they share a shard)."""
    video, text = S.row_locations(row)
    video = {member: moved.get((loc.shard, loc.offset), loc) for member, loc in video.items()}
    return {**row, **S.location_columns(video, moved.get((text.shard, text.offset), text))}


def _delete_after_commit(store: Path, shards: list[str], temp_files: list[Path]) -> None:
    for shard in shards:
        (store / shard).unlink(missing_ok=True)
    for path in temp_files:
        path.unlink(missing_ok=True)
    shutil.rmtree(store / PENDING, ignore_errors=True)
    for folder in (store / S.SHARDS).iterdir() if (store / S.SHARDS).exists() else []:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


# ---------------------------------------------------------------------------------------------------------
# inspect


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


def preview_vae(model: Model):
    """The model's VAE for previews: bfloat16 on the GPU when there is one, float32 on the CPU."""
    if torch.cuda.is_available():
        return model.load_vae(torch.bfloat16).to("cuda")
    return model.load_vae(torch.float32)


def decode_first_frames(store: Path, rows: list[dict[str, Any]], vae) -> list[np.ndarray]:
    """The first frame of each row's clip, decoded from its cached latent mean through `vae`: uint8 [H, W, 3].

    The store holds the *unscaled* posterior, which is what `vae.decode` takes (the pipelines divide by
    scaling_factor before decoding), so the mean goes in as it is.
    """
    reader = S.ShardReader(store)
    frames = []
    try:
        for r in rows:
            mean = reader.tensors(r["shard"], r["latent_offset"], r["latent_size"])[S.MEAN]
            frames.append(_decode_first_frame(vae, mean.to(vae.device, vae.dtype)))
    finally:
        reader.close()
    return frames


def _decode_first_frame(vae, mean: torch.Tensor) -> np.ndarray:
    # The VAE decodes latent frames in batches (the first one takes the odd remainder) and carries a causal conv
    # cache forward, so the first batch decodes alone to exactly the frames a full decode starts with.
    batch = vae.num_latent_frames_batch_size
    head = mean[:, : batch + mean.shape[1] % batch]
    with torch.no_grad():
        video = vae.decode(head[None]).sample  # [1, 3, F, H, W] in [-1, 1]
    frame = (video[0, :, 0].float() / 2 + 0.5).clamp(0, 1) * 255  # as the pipelines' video processor does
    return frame.round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


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


# ---------------------------------------------------------------------------------------------------------
# extract-frames


@dataclass
class FrameExtraction:
    images_file: Path
    written: int
    bad: list[BadItem]


def extract_first_frames(dataset: Path, out_dir: str = "images", overwrite: bool = False) -> FrameExtraction:
    """Write the first frame of every video of a txt dataset to ``out_dir/<stem>.png`` and list them in
    images.txt, line for line with videos.txt. A video that cannot be read gets an empty line (the txt reader
    then reports that item as bad, as encode would) and is returned in `bad`; images.txt is written last,
    atomically."""
    root = Path(dataset)
    root = root.parent if root.is_file() else root
    videos_file, images_file = root / VIDEOS_FILE, root / IMAGES_FILE
    if not videos_file.is_file():
        raise CogtuneError(f"{videos_file}: not found (extract-frames works on txt datasets: prompts.txt + videos.txt)")
    if images_file.exists() and not overwrite:
        raise CogtuneError(f"{images_file}: exists; pass --overwrite to replace it")
    # images.txt pairs with both lists by line number: lists of different lengths are refused as encode refuses them
    prompts_file = root / PROMPTS_FILE
    lists = read_paired_lists([videos_file, *([prompts_file] if prompts_file.is_file() else [])])
    written_paths = [line.strip() for line in lists[0]]
    names = _image_names(written_paths, out_dir)
    if not overwrite:
        taken = [n for n in dict.fromkeys(names.values()) if (root / n).exists()]
        if taken:
            raise CogtuneError(f"{root / taken[0]}: exists; pass --overwrite to replace it")
    lines, bad, done = [], [], set()
    for number, written in enumerate(written_paths, 1):
        at = f"{VIDEOS_FILE} line {number}"
        try:
            if not written:
                raise CogtuneError("empty path")
            name = names[written]
            if name not in done:  # a video listed twice is written once
                frame = read_frames(root / Path(written).expanduser(), [0])[0]
                save_png(Image.fromarray(frame), root / name)
                done.add(name)
            lines.append(name)
        except CogtuneError as e:
            bad.append(BadItem(written or at, f"{at}: {e}"))
            lines.append("")
    atomic_write_text(images_file, "".join(line + "\n" for line in lines))
    return FrameExtraction(images_file, len(done), bad)


def _image_names(written_paths: list[str], out_dir: str) -> dict[str, str]:
    """Image path (relative to the dataset) for each video path: ``out_dir/<stem>.png``; a stem that two different
    videos share (a/clip.mp4, b/clip.mp4) gets the line number of its later listing appended."""
    names: dict[str, str] = {}
    used: set[str] = set()
    for number, written in enumerate(written_paths, 1):
        if not written or written in names:
            continue
        stem = PurePosixPath(written).stem
        while stem in used:
            stem = f"{stem}-{number}"
        used.add(stem)
        names[written] = (PurePosixPath(out_dir) / f"{stem}.png").as_posix()
    return names
