"""Batches from a store: a bucketed, resumable, data-parallel batch sampler and a prefetching loader.

Order of one epoch, for a given (seed, epoch): the rows of each bucket are shuffled and chunked into batches of
that bucket's batch size, then the order of all batches is shuffled across buckets. Every batch holds rows of one
bucket, so its tensors stack without padding.

Two choices differ from the peers on purpose (bucketed samplers in the field drop a bucket's leftover partial
batch, yield nothing for a bucket smaller than its batch size, or truncate an epoch's batches to a multiple of
the global batch, which drops most videos of a small dataset):

- A bucket's leftover partial batch is kept as a smaller batch, never dropped: every sample is trained on once
  per epoch, and a bucket smaller than its batch size still yields one batch.
- With data parallelism every rank must take the same number of steps (or DDP hangs). The epoch's batch list is
  padded to a multiple of the world size by repeating batches from the start of the shuffled list, then rank r
  takes batches r, r + W, r + 2W, ... So up to W - 1 batches repeat per epoch (`repeated_batches` counts them);
  no sample is dropped.

The position (epoch, batches of that epoch already taken, and where the epoch's segment starts) is the whole
sampler state: the same on every rank, so a checkpoint saved by one rank resumes all of them, on as many ranks or
on another number (the new ranks share out what is left of the epoch). The loader yields each batch with the
position after it, so a checkpoint written after a step resumes exactly at the next batch, however far the
prefetch thread has read ahead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import queue
import sys
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..shared.errors import CogtuneError
from ..shared.store import (
    CLEAN,
    EMBEDDING,
    INDEX,
    LOGVAR,
    MEAN,
    NOISY,
    SAMPLE_COLUMNS,
    SIGMA,
    DamagedMember,
    IndexColumns,
    Manifest,
    ShardReader,
    check_shards,
    read_index_row,
    read_sample,
)

# Separate random streams drawn from one seed: the epoch order, the I2V noise-variant draws, and the
# replacements of damaged samples.
_SHUFFLE_STREAM = 0
_VARIANT_STREAM = 1
_REPLACEMENT_STREAM = 2


@dataclass(frozen=True)
class SamplerPosition:
    """Where iteration continues: the next batch is this rank's batch `batch` of the epoch's current segment."""

    epoch: int
    """Epoch the next batch belongs to (counted from 0)."""
    batch: int
    """Batches of the segment this rank has already taken; equal on every rank."""
    offset: int = 0
    """Where the segment starts in the epoch's batch list: 0, unless a run resumed mid-epoch on another number of
    processes, whose ranks share out what the earlier world size had not taken."""


@dataclass(frozen=True)
class PlannedBatch:
    """One batch as the sampler plans it, with what the loader needs to read it reproducibly."""

    rows: list[int]
    """Positions of the batch's samples in the index (all of one bucket)."""
    epoch: int
    """Epoch of this batch."""
    global_index: int
    """Index of this batch in the epoch's padded batch list, unique across ranks: seeds the I2V draws."""
    after: SamplerPosition
    """Position after this batch: where a checkpoint saved after this step resumes."""


class BucketBatchSampler:
    """Yields batches of index-row positions, one bucket per batch, forever, epoch after epoch.

    `row_buckets[i]` is the bucket of index row i. A bucket's batch size comes from `bucket_batch_sizes`
    (the manifest's), else `batch_size`. Iteration starts at `position` (see `load_state_dict`) and moves it
    past every batch it yields, so `state_dict()` taken after k batches resumes at batch k + 1. Run one
    iterator at a time.
    """

    def __init__(
        self,
        row_buckets: Sequence[str | None],
        batch_size: int,
        *,
        bucket_batch_sizes: Mapping[str, int] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not any(bucket is not None for bucket in row_buckets):
            raise CogtuneError("the store holds no samples: nothing to train on")
        if batch_size < 1:
            raise CogtuneError(f"batch size must be at least 1, got {batch_size}")
        if seed < 0:
            raise CogtuneError(f"seed must be non-negative, got {seed}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise CogtuneError(f"rank {rank} is outside a world of {world_size} processes")
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.position = SamplerPosition(epoch=0, batch=0)
        # rows as numpy arrays, not lists of ints: a million-sample store costs 8 MB here, not 36
        code: dict[str | None, int] = {}
        codes = np.fromiter((code.setdefault(bucket, len(code)) for bucket in row_buckets), np.int32,
                            len(row_buckets))
        # sorted: the epoch order must not depend on the order buckets happen to appear in the index;
        # None: a row kept out of training (the held-out evaluation set)
        self._bucket_rows: dict[str, np.ndarray] = {
            bucket: np.flatnonzero(codes == c) for bucket, c in sorted((b, c) for b, c in code.items() if b is not None)
        }
        overrides = bucket_batch_sizes or {}
        self.batch_sizes = {bucket: overrides.get(bucket) or batch_size for bucket in self._bucket_rows}
        for bucket, size in self.batch_sizes.items():
            if size < 1:
                raise CogtuneError(f"bucket {bucket}: batch size must be at least 1, got {size}")
        self.batches_per_epoch = sum(
            -(-len(rows) // self.batch_sizes[bucket]) for bucket, rows in self._bucket_rows.items()
        )
        self._layout = self._layout_fingerprint()

    @property
    def steps_per_epoch(self) -> int:
        """Batches each rank takes per epoch: the same on every rank."""
        return self.segment_steps(0)

    def segment_steps(self, offset: int) -> int:
        """Batches each rank takes of the segment from `offset` to the end of the epoch."""
        return -(-(self.batches_per_epoch - offset) // self.world_size)

    @property
    def repeated_batches(self) -> int:
        """Batches repeated per epoch so that every rank takes `steps_per_epoch` (fewer than the world size)."""
        return self.steps_per_epoch * self.world_size - self.batches_per_epoch

    def epoch_batches(self, epoch: int, offset: int = 0) -> EpochBatches:
        """The epoch's batch list from `offset` on, padded for all ranks: this rank takes items rank, rank + W, ..."""
        rng = np.random.default_rng([self.seed, _SHUFFLE_STREAM, epoch])
        # as arrays (the rows in shuffled order, and where each batch starts in them and how long it is), with
        # the draws a list of lists took: an epoch of a million batches is planned in a tenth of a second
        order, starts, sizes, taken = [], [], [], 0
        for bucket, rows in self._bucket_rows.items():
            order.append(rows[rng.permutation(len(rows))])
            size = self.batch_sizes[bucket]
            first = np.arange(0, len(rows), size)
            starts.append(taken + first)
            sizes.append(np.minimum(size, len(rows) - first))
            taken += len(rows)
        shuffle = rng.permutation(self.batches_per_epoch)[offset:]
        # cyclic, for the case of fewer batches than ranks
        padding = self.segment_steps(offset) * self.world_size - len(shuffle)
        shuffle = np.concatenate([shuffle, shuffle[np.arange(padding) % len(shuffle)]])
        return EpochBatches(np.concatenate(order), np.concatenate(starts)[shuffle], np.concatenate(sizes)[shuffle])

    def plan(self, start: SamplerPosition) -> Iterator[PlannedBatch]:
        """This rank's batches from `start` on, forever. Pure: leaves `position` alone."""
        epoch, index, offset = start.epoch, start.batch, start.offset
        while True:
            batches, steps = self.epoch_batches(epoch, offset), self.segment_steps(offset)
            for i in range(index, steps):
                global_index = offset + i * self.world_size + self.rank
                after = SamplerPosition(epoch, i + 1, offset) if i + 1 < steps else SamplerPosition(epoch + 1, 0)
                yield PlannedBatch(rows=batches[global_index - offset], epoch=epoch, global_index=global_index,
                                   after=after)
            epoch, index, offset = epoch + 1, 0, 0

    def __iter__(self) -> Iterator[list[int]]:
        for planned in self.plan(self.position):
            self.position = planned.after
            yield planned.rows

    def state_dict(self) -> dict[str, Any]:
        """The position, JSON-ready, with what it is only valid for (seed, world size, bucket layout)."""
        return {
            "epoch": self.position.epoch,
            "batch": self.position.batch,
            "offset": self.position.offset,
            "seed": self.seed,
            "world_size": self.world_size,
            "layout": self._layout,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position; refuses one saved under a different seed or data layout.

        Saved under another world size, the epoch goes on where it stood: what the old ranks took of it (their
        padding repeats aside) is skipped, and the new ranks share out the rest, padded to their number.
        """
        if state.get("seed") != self.seed:
            raise CogtuneError(
                f"cannot resume: the checkpoint's data order was made with seed {state.get('seed')}, this run has "
                f"{self.seed} (resume with the same seed, or start a new run)"
            )
        if state.get("layout") != self._layout:
            raise CogtuneError(
                "cannot resume: the store's samples or batch sizes changed since the checkpoint "
                "(resume with the same store and batch sizes, or start a new run)"
            )
        epoch, batch, world = (int(state[k]) for k in ("epoch", "batch", "world_size"))
        offset = int(state.get("offset", 0))  # checkpoints from before elastic resume have none
        if epoch < 0 or not 0 <= offset < self.batches_per_epoch or batch < 0:
            raise CogtuneError(f"cannot resume: position epoch {epoch} batch {batch} offset {offset} is out of range")
        if world != self.world_size:
            taken = min(offset + batch * world, self.batches_per_epoch)
            epoch, batch, offset = (epoch + 1, 0, 0) if taken == self.batches_per_epoch else (epoch, 0, taken)
        if batch >= self.segment_steps(offset):
            raise CogtuneError(f"cannot resume: position epoch {epoch} batch {batch} offset {offset} is out of range")
        self.position = SamplerPosition(epoch, batch, offset)

    def _layout_fingerprint(self) -> str:
        """Hash of which rows are in which bucket and the batch sizes: a position means nothing if they change."""
        layout = {bucket: [rows.tolist(), self.batch_sizes[bucket]] for bucket, rows in self._bucket_rows.items()}
        return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]


class EpochBatches(Sequence):
    """One epoch's batches as `BucketBatchSampler.epoch_batches` plans them: batch i is the rows
    ``order[starts[i] : starts[i] + sizes[i]]``, made into a list when asked for."""

    def __init__(self, order: np.ndarray, starts: np.ndarray, sizes: np.ndarray):
        self._order, self._starts, self._sizes = order, starts, sizes

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        start = int(self._starts[i])
        return self._order[start : start + int(self._sizes[i])].tolist()


class StoreDataset:
    """The index rows of a store, read by random access and stacked into batch dicts.

    A batch dict holds ``mean``, ``logvar`` [B, C, F, H, W] (unscaled posterior), ``embedding`` [B, L, D] and
    ``rows`` [B] (index positions). For I2V stores it adds ``clean`` [B, C, 1, H, W] and, per sample, one of the K
    cached noise-augmented image latents: ``noisy`` [B, C, 1, H, W], its ``sigma`` [B] and ``variant`` [B] (which
    of the K). The variant is drawn from (seed, epoch, batch, row), so a resumed run draws the same ones.
    Reads go through one file-handle cache: use a dataset from one thread at a time.
    """

    def __init__(self, store: Path, seed: int = 0, on_damaged: str = "stop", held_out: Collection[int] = ()):
        self.store = Path(store)
        self.manifest = Manifest.load(self.store)
        self.index = IndexColumns(self.store, ("bucket", *SAMPLE_COLUMNS))
        if not len(self.index):
            raise CogtuneError(f"{self.store / INDEX}: no samples (run cogprep encode first)")
        check_shards(self.store, self.index)
        self.seed = seed
        self.on_damaged = on_damaged
        self.damaged: list[dict[str, str]] = []
        """Samples found damaged and skipped (--on-damaged skip), in the order met: key, source, error."""
        self.held_out = frozenset(held_out)
        """Rows kept out of training (the held-out evaluation set): never yielded, never a replacement."""
        self._reader = ShardReader(self.store)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def row_buckets(self) -> list[str]:
        return self.index.strings("bucket")

    @property
    def training_row_buckets(self) -> list[str | None]:
        """`row_buckets` with None for the held-out rows: what the sampler takes."""
        return [None if row in self.held_out else bucket for row, bucket in enumerate(self.row_buckets)]

    @property
    def bucket_batch_sizes(self) -> dict[str, int]:
        """Per-bucket batch sizes the manifest sets (buckets without one use the global batch size)."""
        return {b["name"]: b["batch_size"] for b in self.manifest.buckets if b.get("batch_size")}

    def read_batch(self, planned: PlannedBatch) -> dict[str, torch.Tensor]:
        rows, samples = [], []
        for row in planned.rows:
            row, sample = self._read_or_replace(row, planned)
            rows.append(row)
            samples.append(sample)
        with_image = [NOISY in sample for sample in samples]
        if any(with_image) and not all(with_image):
            raise CogtuneError(f"{self.store / INDEX}: rows with and without image latents in one bucket")
        batch = {
            name: torch.stack([sample[name] for sample in samples]) for name in (MEAN, LOGVAR, EMBEDDING)
        }
        batch["rows"] = torch.tensor(rows, dtype=torch.long)
        if all(with_image):
            variants = [self._draw_variant(planned, row, len(sample[SIGMA])) for row, sample in zip(rows, samples)]
            batch[CLEAN] = torch.stack([sample[CLEAN] for sample in samples])
            batch[NOISY] = torch.stack([sample[NOISY][k] for sample, k in zip(samples, variants)])
            batch[SIGMA] = torch.stack([sample[SIGMA][k] for sample, k in zip(samples, variants)])
            batch["variant"] = torch.tensor(variants, dtype=torch.long)
        return batch

    def _read_or_replace(self, row: int, planned: PlannedBatch) -> tuple[int, dict[str, torch.Tensor]]:
        """(row, its tensors); with --on-damaged skip a damaged row is replaced by another row of its bucket,
        drawn from (seed, epoch, batch, row) so that a resumed run replaces it alike. The batch keeps its size,
        so every rank keeps its step count."""
        try:
            return row, self._read(row)
        except DamagedSample as damage:
            if self.on_damaged != "skip":
                raise
            self._record(damage)
        bucket = self.row_buckets_array[row]
        same_bucket = np.flatnonzero(self.row_buckets_array == bucket)
        rng = np.random.default_rng([self.seed, _REPLACEMENT_STREAM, planned.epoch, planned.global_index, row])
        for other in rng.permutation(same_bucket).tolist():
            if other == row or other in self.held_out or any(d["row"] == other for d in self.damaged):
                continue
            try:
                return other, self._read(other)
            except DamagedSample as damage:
                self._record(damage)
        raise CogtuneError(f"{self.store}: every sample of bucket {bucket} is damaged: run cogprep verify {self.store}")

    def _read(self, row: int) -> dict[str, torch.Tensor]:
        try:
            return read_sample(self._reader, self.index.row(row))
        except (DamagedMember, OSError) as e:
            key, source = read_index_row(self.store, row, ("key", "source")).values()
            shard = self.index.row(row)["shard"]
            raise DamagedSample(
                f"{self.store / shard}: sample {key} (source {source}) is damaged ({e}): run cogprep verify "
                f"{self.store}, then cogprep encode; or train on with --on-damaged skip",
                {"row": row, "key": key, "source": source, "error": str(e)},
            ) from None

    def _record(self, damage: DamagedSample) -> None:
        if all(d["row"] != damage.record["row"] for d in self.damaged):
            self.damaged.append(damage.record)
            print(f"cogtrain: skipped damaged sample {damage.record['key']} (source {damage.record['source']}): "
                  f"{damage.record['error']}", file=sys.stderr, flush=True)

    @functools.cached_property
    def row_buckets_array(self) -> np.ndarray:
        return np.asarray(self.index.strings("bucket"))

    def _draw_variant(self, planned: PlannedBatch, row: int, count: int) -> int:
        rng = np.random.default_rng([self.seed, _VARIANT_STREAM, planned.epoch, planned.global_index, row])
        return int(rng.integers(count))

    def close(self) -> None:
        self._reader.close()


class DamagedSample(CogtuneError):
    """A sample whose cached members cannot be read; `record` names it (row, key, source, error)."""

    def __init__(self, message: str, record: dict[str, Any]):
        super().__init__(message)
        self.record = record


@dataclass(frozen=True)
class _Failure:
    """An exception raised in the prefetch thread, handed to the consumer to re-raise."""

    error: BaseException
    """What the thread raised."""


class StoreLoader:
    """Yields ``(batch, position)`` forever: the batch dict, and the sampler state after it (JSON-ready).

    Save ``position`` with a checkpoint taken after the batch's step; `load_state_dict(position)` on a fresh
    loader continues with the next batch. With `prefetch` > 0 a background thread reads up to `prefetch`
    batches ahead (the one it is reading counts), so the step does not wait on disk: the caller's batch and at
    most `prefetch` more are in memory. `prefetch` 0 reads in the caller.
    Both give the same batches. One iteration at a time; a new `iter()` restarts from the last yielded position.
    """

    def __init__(self, dataset: StoreDataset, sampler: BucketBatchSampler, prefetch: int = 1):
        if prefetch < 0:
            raise CogtuneError(f"prefetch must be 0 or more, got {prefetch}")
        self.dataset = dataset
        self.sampler = sampler
        self.prefetch = prefetch

    @classmethod
    def from_store(
        cls,
        store: Path,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 1,
        on_damaged: str = "stop",
        held_out: Collection[int] = (),
    ) -> StoreLoader:
        """The loader a training run uses: the manifest's per-bucket batch sizes, `batch_size` for the rest;
        the rows `held_out` (the evaluation set) are never yielded."""
        dataset = StoreDataset(store, seed=seed, on_damaged=on_damaged, held_out=held_out)
        sampler = BucketBatchSampler(
            dataset.training_row_buckets,
            batch_size,
            bucket_batch_sizes=dataset.bucket_batch_sizes,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
        return cls(dataset, sampler, prefetch=prefetch)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch yielded to the caller (not after what the thread read ahead)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        planned_batches = self.sampler.plan(self.sampler.position)
        if self.prefetch == 0:
            for planned in planned_batches:
                batch = self.dataset.read_batch(planned)
                self.sampler.position = planned.after
                yield batch, self.sampler.state_dict()
            return
        # a slot per batch read ahead, taken before the read starts: at most `prefetch` batches in host memory
        # besides the caller's (a bounded queue alone would let the thread hold one more, waiting to put it)
        slots, ready, stop = threading.Semaphore(self.prefetch), queue.SimpleQueue(), threading.Event()
        thread = threading.Thread(target=self._read_ahead, args=(planned_batches, slots, ready, stop), daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                slots.release()
                if isinstance(item, _Failure):
                    raise item.error
                batch, after = item
                # the sampler follows what the caller has received, not what the thread has read
                self.sampler.position = after
                yield batch, self.sampler.state_dict()
        finally:
            stop.set()
            thread.join()

    def _read_ahead(self, planned_batches: Iterator[PlannedBatch], slots: threading.Semaphore,
                    ready: queue.SimpleQueue, stop: threading.Event) -> None:
        try:
            for planned in planned_batches:
                # a bounded wait, so that a consumer that stopped listening (stop set) never leaves us blocked
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                ready.put((self.dataset.read_batch(planned), planned.after))
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer's thread
            ready.put(_Failure(error))
