"""Whether a store is current with its dataset, answered by columns: cogtrain's start-up check and `cogprep status`.

The full answer is `plan_against_store(...).changes`: a content key per entry, from the file-hash cache, the
probe cache and the settings. When the store is current that work only recomputes the keys the index already
holds. The keys are a function of (source, final caption, kind, content hash, settings, model fingerprints),
the content hash is trusted while a file's (size, mtime) is unchanged (as `FileHashes` trusts it), and the
settings and fingerprints checked here are those the store recorded. So where every dataset entry's (source,
caption, kind, size, mtime) is one the index records, and the index records no other, the plan would find
every source unchanged: `current_by_columns` compares those five columns (pyarrow) and hashes nothing.

Anything it cannot decide that way (an entry the index lacks: a new clip, an edited caption, a touched file, or
one the last encode skipped; a conditioning image, whose hash the index does not break out; items `cogprep
verify` found damaged) is left to the full plan, which says exactly what changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..shared import store as S
from ..shared.variants import get_variant
from .datasets import read_dataset

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


def dataset_changes(dataset: Path, store: Path) -> dict[str, int]:
    """How many sources are new, changed, removed and unchanged since the store was encoded: by columns where
    that decides it (see the module doc), else by the full plan."""
    current = current_by_columns(dataset, store)
    if current is not None:
        return {"new": 0, "changed": 0, "removed": 0, "unchanged": current.unchanged}
    from .plan import plan_against_store

    return {kind: len(sources) for kind, sources in plan_against_store(dataset, store).changes.items()}


def current_by_columns(dataset: Path, store: Path, fingerprints: dict[str, str] | None = None) -> Current | None:
    """What a current store holds, or None where the columns cannot say it is current (the full plan decides).
    `fingerprints`: the model's components' (see `plan_against_store`), by default those the store recorded."""
    manifest = S.Manifest.load(store)
    recorded = manifest.model["fingerprints"]
    if fingerprints is not None and any(fingerprints.get(c) != recorded.get(c) for c in KEYED_COMPONENTS):
        return None
    if S.read_damaged(store):
        return None
    info = manifest.dataset
    data = read_dataset(dataset, info.get("layout"), caption_column=info.get("caption_column"),
                        video_column=info.get("video_column"), id_token=info.get("id_token"))
    # an image-to-video model skips image entries (the plan reports them as bad, never as samples)
    i2v = get_variant(manifest.model["variant"]).task == "i2v"
    items = [item for item in data.items if not (i2v and item.kind == "image")]
    bad = len(data.bad) + len(data.items) - len(items)
    if any(item.image is not None for item in items):
        return None
    # numbers straight into numpy: a million Python ints in lists would cost another 100 MB at the peak
    listed = pa.table({
        "source": pa.array([item.source for item in items], pa.string()),
        "caption": pa.array([item.caption for item in items], pa.string()),
        "kind": pa.array([item.kind for item in items], pa.string()),
        "source_size": np.fromiter((item.stat.st_size for item in items), np.int64, len(items)),
        "source_mtime_ns": np.fromiter((item.stat.st_mtime_ns for item in items), np.int64, len(items)),
    })
    del data, items
    index = S.read_index_table(store, COMPARED)
    if index is None:
        return None
    # several rows of one entry (its clip windows), or one entry listed twice: each compared once
    listed, index = _distinct(listed), _distinct(index)
    if listed.num_rows != index.num_rows or not listed.equals(index):
        return None
    return Current(unchanged=pc.count_distinct(index.column("source")).as_py(), bad=bad)


def _distinct(table: pa.Table) -> pa.Table:
    """The distinct rows of `table`, sorted: two tables of the same rows in any order and number compare equal."""
    names = list(COMPARED)
    distinct = table.group_by(names, use_threads=False).aggregate([]).select(names)
    return distinct.sort_by([(name, "ascending") for name in names]).combine_chunks()
