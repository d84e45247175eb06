"""`cogprep gc`: reclaim the space of a store's dead items.

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

import dataclasses
import math
import shutil
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..shared import store as S
from ..shared.atomic import fsync_dir
from ..shared.errors import CogtuneError
from .encode import PENDING

TAR_BLOCK = 512


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
    index_version: tuple[int, int]
    """(mtime_ns, size) of index.parquet as planned: `run_gc` refuses an index changed since."""
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
    stat = (store / S.INDEX).stat()
    plan = GcPlan(index_version=(stat.st_mtime_ns, stat.st_size))
    referenced = S.referenced_members(store)
    missing: dict[str, np.ndarray] = {}
    for shard in S.list_shards(store):
        try:
            items = S.scan_shard(store, shard)
        except (tarfile.TarError, OSError) as e:
            if shard in referenced:
                problem = f"unreadable ({e}), yet the index points at it: store damaged"
                raise CogtuneError(f"{store / shard}: {problem}") from None
            plan.delete.append(shard)
            continue
        live, missing[shard] = _live_items(items, *referenced.pop(shard, (np.zeros(0, np.int64),) * 2))
        use = ShardUse(shard, (store / shard).stat().st_size, items, live)
        if live and len(live) == len(items):
            plan.keep.append(use)
        elif live:
            plan.rewrite.append(use)
        else:
            plan.delete.append(shard)
    missing.update({shard: np.unique(np.stack(members, axis=1), axis=0) for shard, members in referenced.items()})
    _refuse_missing(store, missing)
    leftovers = sorted((store / S.SHARDS).glob("*/.*.tar.tmp")) + sorted((store / PENDING).rglob("*"))
    plan.temp_files = [p for p in leftovers if p.is_file()]
    return plan


def _live_items(items: dict[str, dict[str, S.Location]], offsets: np.ndarray,
                sizes: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The keys of a shard's `items` some referenced member (`offsets`, `sizes`) lies in, in tar order, and the
    distinct referenced (offset, size) pairs no member of `items` matches, sorted."""
    members = [loc for locations in items.values() for loc in locations.values()]
    if not members:
        return [], np.unique(np.stack([offsets, sizes], axis=1), axis=0)
    item_of = np.repeat(np.arange(len(items)), [len(locations) for locations in items.values()])
    found_offsets = np.array([loc.offset for loc in members], np.int64)
    order = np.argsort(found_offsets)  # a tar's members never share an offset
    found_offsets, found_sizes = found_offsets[order], np.array([loc.size for loc in members], np.int64)[order]
    at = np.minimum(np.searchsorted(found_offsets, offsets), len(members) - 1)
    hit = (found_offsets[at] == offsets) & (found_sizes[at] == sizes)
    live = np.zeros(len(items), bool)
    live[item_of[order][at[hit]]] = True
    unmatched = np.stack([offsets[~hit], sizes[~hit]], axis=1)
    return [key for key, is_live in zip(items, live.tolist()) if is_live], np.unique(unmatched, axis=0)


def _refuse_missing(store: Path, missing: dict[str, np.ndarray]) -> None:
    """Refuse an index that points where no item is; `missing` holds each shard's distinct (offset, size) pairs."""
    damaged = sorted(shard for shard, pairs in missing.items() if len(pairs))
    if damaged:
        shard, offset = damaged[0], int(missing[damaged[0]][0, 0])
        count = sum(len(missing[s]) for s in damaged)
        raise CogtuneError(f"{store / S.INDEX}: points at {shard} byte {offset}, where no item is: store damaged "
                           f"({count} such members); gc refused")


def run_gc(store: Path, plan: GcPlan) -> int:
    """Carry out `plan` (copy, commit, delete: see the module doc); returns how many items were copied."""
    store = Path(store)
    stat = (store / S.INDEX).stat()
    if (stat.st_mtime_ns, stat.st_size) != plan.index_version:
        raise CogtuneError(f"{store / S.INDEX}: changed since gc planned (an encode ran?): run cogprep gc again")
    moved = _copy_live_items(store, plan.rewrite)
    if moved:
        S.write_index(store, _relocated_index(store, moved, {u.shard for u in plan.rewrite}))  # the commit point
    _delete_after_commit(store, [u.shard for u in plan.rewrite] + plan.delete, plan.temp_files)
    return sum(len(u.live) for u in plan.rewrite)


def _copy_live_items(store: Path, rewrite: list[ShardUse]) -> dict[tuple[str, int], S.Location]:
    """Copy the live items of `rewrite` into new shards of the same buckets; {(old shard, offset): new Location}."""
    prefix = f"gc-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}"
    writers: dict[str, S.ShardWriter] = {}
    reader = S.ShardReader(store)
    moved: dict[tuple[str, int], S.Location] = {}
    try:
        for use in rewrite:
            bucket = PurePosixPath(use.shard).parent.name
            if bucket not in writers:
                writers[bucket] = S.ShardWriter(store, bucket, prefix)  # an encode's default shard sizes
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


def _relocated_index(store: Path, moved: dict[tuple[str, int], S.Location], rewritten: set[str]) -> pa.Table:
    """The whole index with the new locations of `moved` members: rows that point into a `rewritten` shard are
    rebuilt one by one, the others are carried over as Arrow columns."""
    index = S.read_index_table(store, S.INDEX_SCHEMA.names)
    shards = pa.array(sorted(rewritten), pa.string())
    touched = pc.or_(pc.is_in(index["shard"], shards), pc.is_in(index["text_shard"], shards))
    rows = [_relocate(row, moved) for row in index.filter(touched).to_pylist()]
    return pa.concat_tables([index.filter(pc.invert(touched)).cast(S.INDEX_SCHEMA),
                             pa.Table.from_pylist(rows, schema=S.INDEX_SCHEMA)])


def _relocate(row: dict[str, Any], moved: dict[tuple[str, int], S.Location]) -> dict[str, Any]:
    """The row with its members' new locations (a video item's members move together: they share a shard)."""

    def new_location(loc: S.Location) -> S.Location:
        # the bytes move unchanged, so the CRC recorded when they were written moves with them: one computed from
        # the copy would vouch for damage the old bytes already had
        new = moved.get((loc.shard, loc.offset))
        return loc if new is None else dataclasses.replace(new, crc=loc.crc)

    video, text = S.row_locations(row)
    return {**row, **S.location_columns({member: new_location(loc) for member, loc in video.items()},
                                        new_location(text))}


def _delete_after_commit(store: Path, shards: list[str], temp_files: list[Path]) -> None:
    for shard in shards:
        (store / shard).unlink(missing_ok=True)
    for path in temp_files:
        path.unlink(missing_ok=True)
    shutil.rmtree(store / PENDING, ignore_errors=True)
    for folder in (store / S.SHARDS).iterdir() if (store / S.SHARDS).exists() else []:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
