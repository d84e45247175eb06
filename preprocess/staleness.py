"""Whether a store is current with its dataset, answered by columns: cogtrain's start-up check and `cogprep status`.

The full answer is `plan_against_store(...).changes`: a content key per entry, from the file-hash cache, the
probe cache and the settings. When the store is current that work only recomputes the keys the index already
holds. The keys are a function of (source, final caption, kind, content hash, settings, model fingerprints),
the content hash is trusted while a file's (size, mtime) is unchanged (as `FileHashes` trusts it), and the
settings and fingerprints checked here are those the store recorded. So where every dataset entry's (source,
caption, kind, size, mtime) is one the index records, and the index records no other, the plan would find
every source unchanged: `current_by_columns` compares those five columns (pyarrow) and hashes nothing.

Where something differs, only the sources that differ are planned: an entry the index lacks (a new clip, an
edited caption, a touched file, one the last encode skipped), an index row the dataset no longer lists, an entry
with a conditioning image (whose hash the index does not break out) and a source with items `cogprep verify`
found damaged. Every entry of those sources, and nothing else, becomes a `DatasetItem` and goes through the plan
(`plan_against_store(..., within=...)`), which says exactly what changed; the rest are unchanged by columns.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..shared import store as S
from ..shared.fingerprint import FileHashes
from ..shared.variants import get_variant
from .datasets import Dataset, DatasetColumns, read_columns

if TYPE_CHECKING:
    from .plan import Plan

KEYED_COMPONENTS = ("vae", "text_encoder", "tokenizer")
"""The model components whose fingerprints are part of the content keys."""
COMPARED = ("source", "caption", "kind", "source_size", "source_mtime_ns")
"""What the index records of each entry and the dataset gives again: equal everywhere means current."""


@dataclass(frozen=True)
class Current:
    """What `current_by_columns` found of a current store."""

    unchanged: int
    """Sources listed, all unchanged."""
    bad: int
    """Entries the dataset reader refused, and image entries an image-to-video model skips (as the plan counts
    its bad items where every other entry is current)."""


@dataclass(frozen=True)
class StoreChanges:
    """What an encode of the dataset would do to the store: what `cogprep status` reports."""

    changes: dict[str, list[str]]
    """Sources by what an encode does to them: new, changed, removed (sorted)."""
    unchanged: int
    """Sources listed and unchanged."""
    video_jobs: int
    """Video items no shard holds yet."""
    text_jobs: int
    """Text items no shard holds yet."""
    bad: int
    """Entries the dataset reader refused or the plan skipped."""

    @property
    def stale(self) -> bool:
        return any(self.changes.values())

    def counts(self) -> dict[str, int]:
        return {**{kind: len(sources) for kind, sources in self.changes.items()}, "unchanged": self.unchanged}


@dataclass
class _Comparison:
    """The dataset compared with the index by columns (see the module doc)."""

    columns: DatasetColumns
    differing: pa.Array
    """The distinct sources the columns cannot call unchanged."""
    differing_entries: np.ndarray
    """Positions in `columns` of the entries of those sources (image entries an image-to-video model skips aside)."""
    unchanged: int
    """Sources the columns call unchanged."""
    bad: int
    """Entries the reader refused, and image entries an image-to-video model skips."""


def dataset_changes(dataset: Path, store: Path) -> dict[str, int]:
    """How many sources are new, changed, removed and unchanged since the store was encoded: by columns where
    that decides it, else by planning the sources that differ (see the module doc)."""
    return store_changes(dataset, store).counts()


def store_changes(dataset: Path, store: Path, fingerprints: dict[str, str] | None = None,
                  hashes: FileHashes | None = None) -> StoreChanges:
    """What an encode of `dataset` would do to `store`: by columns, planning only the sources that differ.
    `fingerprints`, `hashes`: as `plan_against_store` takes them; another model's fingerprints, or hashes that
    re-hash every file (trusting no size and mtime), plan every entry."""
    from .plan import plan_against_store

    rehash = hashes is not None and hashes.rehash
    compared = None if rehash else _compare(dataset, store, fingerprints)
    if compared is None:
        return _from_plan(plan_against_store(dataset, store, fingerprints, hashes), bad=0)
    if not len(compared.differing):
        return StoreChanges({"new": [], "changed": [], "removed": []}, compared.unchanged, 0, 0, compared.bad)
    columns = compared.columns
    data = Dataset(columns.layout, columns.file, columns.items(compared.differing_entries.tolist()), [])
    plan = plan_against_store(dataset, store, fingerprints, hashes, data=data,
                              within=set(compared.differing.to_pylist()))
    return _from_plan(plan, bad=compared.bad, unchanged=compared.unchanged)


def _from_plan(plan: Plan, bad: int, unchanged: int = 0) -> StoreChanges:
    """`plan`'s changes, with `unchanged` sources and `bad` entries it did not see."""
    changes = {kind: plan.changes[kind] for kind in ("new", "changed", "removed")}
    return StoreChanges(changes, unchanged + len(plan.changes["unchanged"]), len(plan.video_jobs),
                        len(plan.text_jobs), bad + len(plan.bad))


def current_by_columns(dataset: Path, store: Path, fingerprints: dict[str, str] | None = None,
                       columns: DatasetColumns | None = None) -> Current | None:
    """What a current store holds, or None where the columns cannot say it is current (the plan decides).
    `fingerprints`: the model's components' (see `plan_against_store`), by default those the store recorded.
    `columns`: the dataset's, where the caller has read it with the options the store recorded (`columns_of`)."""
    compared = _compare(dataset, store, fingerprints, columns)
    if compared is None or len(compared.differing):
        return None
    return Current(unchanged=compared.unchanged, bad=compared.bad)


def indexed_sources(store: Path) -> list[str]:
    """The distinct sources of the store's index, sorted: a current store's unchanged sources (as the plan lists
    them in `Plan.changes`)."""
    index = S.read_index_table(store, ("source",))
    return sorted(pc.unique(index["source"]).to_pylist()) if index is not None else []


def columns_of(dataset: Dataset) -> DatasetColumns | None:
    """The entries of `dataset`, read already, as the columns `_compare` takes (not `DatasetColumns.items`'s:
    no declared sizes); None where an item carries no stat of its file (it was made otherwise)."""
    items = dataset.items
    if any(item.stat is None for item in items):
        return None
    images = [item.image for item in items]
    return DatasetColumns(dataset.layout, dataset.file, [item.source for item in items],
                          [item.caption for item in items], [item.kind for item in items],
                          [str(item.path) for item in items],
                          np.array([item.stat.st_size for item in items], np.int64),
                          np.array([item.stat.st_mtime_ns for item in items], np.int64),
                          [item.line for item in items], list(dataset.bad),
                          images if any(image is not None for image in images) else None)


def _compare(dataset: Path, store: Path, fingerprints: dict[str, str] | None,
             given: DatasetColumns | None = None) -> _Comparison | None:
    """The dataset compared with the index by columns; None where the columns can decide nothing (another model's
    fingerprints, no index yet)."""
    manifest = S.Manifest.load(store)
    recorded = manifest.model["fingerprints"]
    if fingerprints is not None and any(fingerprints.get(c) != recorded.get(c) for c in KEYED_COMPONENTS):
        return None
    damaged = S.read_damaged(store)
    if not (Path(store) / S.INDEX).exists():
        return None
    info = manifest.dataset
    with ThreadPoolExecutor(1, thread_name_prefix="cogtune-index") as pool:
        # the index is read (by Arrow, which lets go of the GIL) while the dataset is read and its files stat-ed
        reading = pool.submit(S.read_index_table, store, (*COMPARED, "video_key", "text_key") if damaged else COMPARED)
        columns = given if given is not None else read_columns(
            dataset, info.get("layout"), caption_column=info.get("caption_column"),
            video_column=info.get("video_column"), id_token=info.get("id_token"))
        index = reading.result()
    if index is None:
        return None
    listed = listed_table(columns)
    # an image-to-video model skips image entries (the plan reports them as bad, never as samples)
    planned = np.arange(len(columns))
    if get_variant(manifest.model["variant"]).task == "i2v":
        videos = pc.equal(listed["kind"], "video")
        listed, planned = listed.filter(videos), planned[videos.to_numpy(zero_copy_only=False)]
    bad = len(columns.bad) + len(columns) - listed.num_rows
    unmatched, distinct_sources = _unmatched_sources(listed, index)
    differing = [unmatched]
    if columns.image is not None:  # the index does not break out a conditioning image's hash
        differing.append(pa.array([columns.source[i] for i in planned if columns.image[i] is not None], pa.string()))
    if damaged:
        keys = pa.array(list(damaged), pa.string())
        hit = pc.or_(pc.is_in(index["video_key"], value_set=keys), pc.is_in(index["text_key"], value_set=keys))
        differing.append(index["source"].filter(hit))
    differing = pc.unique(pa.chunked_array(differing, pa.string()).combine_chunks())
    if not len(differing):  # the common case, current: every source is unchanged, no entry is planned
        return _Comparison(columns, differing, planned[:0], distinct_sources, bad)
    sources = index["source"]
    unchanged = pc.count_distinct(sources.filter(pc.invert(pc.is_in(sources, value_set=differing)))).as_py()
    entries = planned[pc.is_in(listed["source"], value_set=differing).to_numpy(zero_copy_only=False)]
    return _Comparison(columns, differing, entries, unchanged, bad)


def listed_table(columns: DatasetColumns) -> pa.Table:
    """The COMPARED values of the dataset's usable entries, as an Arrow table in dataset order."""
    return pa.table({"source": pa.array(columns.source, pa.string()),
                     "caption": pa.array(columns.caption, pa.string()),
                     "kind": pa.array(columns.kind, pa.string()),
                     "source_size": columns.size, "source_mtime_ns": columns.mtime_ns})


def _unmatched_sources(listed: pa.Table, index: pa.Table) -> tuple[pa.Array, int]:
    """(the sources of the rows of either table whose COMPARED values no row of the other has, as the two
    anti-joins of `_unmatched` find them; the number of distinct sources in `index`).

    The anti-joins hash five columns of both tables (2.1 CPU s at a million rows). Here the sources are
    dictionary-encoded once, both tables together, and each listed row is compared with an index row that has
    its source (found by code, in numpy): equal, both rows are matched; an index row left unmatched so is
    compared with a listed row of its source. A row that finds no equal row that way (none has its source, or
    another one of several with it would match) makes its source a suspect, and only the rows of suspect sources
    are anti-joined: every row of any other source is matched, so the answer is exactly the anti-joins'. A null
    source matches nothing, as in the anti-joins."""
    count = listed.num_rows
    encoded = pa.chunked_array([*listed["source"].chunks, *index["source"].chunks], pa.string())
    encoded = encoded.combine_chunks().dictionary_encode()
    null_code = len(encoded.dictionary)
    codes = pc.fill_null(encoded.indices, null_code).to_numpy().astype(np.int64)
    listed_codes, index_codes = codes[:count], codes[count:]
    in_index = _row_by_code(index_codes, null_code)
    at = in_index[listed_codes]
    same = _same_as(listed, index, at)
    # an index row some listed row equals is matched; only the others are compared the other way (a current
    # store: none), each with a listed row of its source
    matched = np.zeros(index.num_rows, bool)
    matched[at[same]] = True
    rest = np.flatnonzero(~matched)
    rest_rows = index.take(pa.array(rest))
    rest_same = _same_as(rest_rows, listed, _row_by_code(listed_codes, null_code)[index_codes[rest]])
    suspects = pa.concat_arrays([listed["source"].filter(pa.array(~same)).combine_chunks(),
                                 rest_rows["source"].filter(pa.array(~rest_same)).combine_chunks()])
    distinct_in_index = int(np.count_nonzero(in_index >= 0))
    if not len(suspects):  # the common case, a current store: no anti-join at all
        return suspects, distinct_in_index
    suspects = pc.unique(suspects)
    listed = listed.filter(pc.is_in(listed["source"], value_set=suspects))
    index = index.filter(pc.is_in(index["source"], value_set=suspects))
    unmatched = [_unmatched(listed, index)["source"], _unmatched(index, listed)["source"]]
    return pa.chunked_array(unmatched, pa.string()).combine_chunks(), distinct_in_index


def _row_by_code(codes: np.ndarray, null_code: int) -> np.ndarray:
    """For each source code, a row (any one) whose source has it, or -1 where none has, or the source is null."""
    rows = np.full(null_code + 1, -1, np.int64)
    rows[codes] = np.arange(len(codes))
    rows[null_code] = -1
    return rows


def _same_as(table: pa.Table, other: pa.Table, rows: np.ndarray) -> np.ndarray:
    """Whether each row of `table` has the COMPARED values of row `rows[i]` of `other` (False where that is -1).
    The sources are equal by code; the rest compared column by column (a null equals nothing)."""
    same = rows >= 0
    if not other.num_rows:
        return same
    taken = pa.array(np.where(same, rows, 0))
    for name in COMPARED[1:]:
        equal = pc.fill_null(pc.equal(table[name], other[name].take(taken)), False)
        same &= equal.to_numpy(zero_copy_only=False)
    return same


def _unmatched(table: pa.Table, other: pa.Table) -> pa.Table:
    """The rows of `table` whose COMPARED values no row of `other` has: a hash join on the five columns as they
    are (an anti-join), where one joined string per row cost a string copy of every row on both sides (at a
    million rows, 3.4 s of CPU against 2.1; on Arrow's threads 2.6). No compared value is null in a dataset's
    columns, and a null in the index matches nothing, as before."""
    keys = list(COMPARED)
    return table.select(keys).join(other.select(keys), keys=keys, join_type="left anti", use_threads=False)
