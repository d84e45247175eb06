"""cogtrain's start at scale: the dataset check runs once per job (rank 0, on a thread beside the model load)
and every rank refuses a stale dataset from its answer; the sampler plans an epoch as arrays, with the batches
and the order a list of lists gave."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from cogtune.train import checks
from cogtune.train.checks import StalenessCheck, check_run
from cogtune.train.config import TrainConfig
from cogtune.train.data import BucketBatchSampler
from hypothesis import given, settings
from hypothesis import strategies as st
from prep_helpers import add_clip
from train_helpers import cogtrain_command, launch


@pytest.fixture
def stale_dataset(train_dataset, tmp_path) -> Path:
    edited = shutil.copytree(train_dataset, tmp_path / "edited")
    add_clip(edited, "extra.mp4", "a green square moving up over a black background", frames=20)
    return edited


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_rank_0_checks_the_dataset(train_store, tiny_models, stale_dataset, tmp_path, monkeypatch, rank):
    monkeypatch.setenv("RANK", rank)
    checked = []
    monkeypatch.setattr(checks, "dataset_changes", lambda *args: checked.append(args) or {
        "new": 1, "changed": 0, "removed": 0, "unchanged": 0})
    config = TrainConfig(store=train_store, model=str(tiny_models["5b"]), out=tmp_path / "run",
                         dataset=stale_dataset, mixed_precision="no", report_to="none")
    inputs = check_run(config)
    if rank == "1":
        assert inputs.staleness is None and not checked
        return
    assert inputs.staleness.problem() == ("dataset changed since the store was encoded (1 new, 0 changed, "
                                          "0 removed): run cogprep encode, or pass --allow-stale")
    assert checked == [(stale_dataset, train_store)]


def test_an_error_in_the_check_reaches_the_caller(train_store, tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug in the check")

    monkeypatch.setattr(checks, "dataset_changes", broken)
    config = TrainConfig(store=train_store, model="m", out=tmp_path / "run", dataset=tmp_path)
    check = StalenessCheck(config, None)
    with pytest.raises(RuntimeError, match="a bug in the check"):
        check.problem()


@pytest.mark.slow
def test_two_ranks_refuse_a_stale_dataset_from_one_check(train_store, tiny_models, stale_dataset, tmp_path):
    out = tmp_path / "run"
    done = launch(cogtrain_command(train_store, tiny_models["5b"], out, "--max-steps", "1", "--dataset",
                                  stale_dataset, processes=2), expect=1)
    refusals = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert refusals == ["error: dataset changed since the store was encoded (1 new, 0 changed, 0 removed): run "
                        "cogprep encode, or pass --allow-stale"] * 2, done.stderr[-3000:]
    assert not out.exists()


def _list_epoch(sampler: BucketBatchSampler, row_buckets, epoch: int, offset: int) -> list[list[int]]:
    """The epoch as the list-of-lists sampler planned it (the code before the arrays), from the same draws."""
    rows: dict[str, list[int]] = {}
    for row, bucket in enumerate(row_buckets):
        if bucket is not None:
            rows.setdefault(bucket, []).append(row)
    rng = np.random.default_rng([sampler.seed, 0, epoch])
    batches = []
    for bucket, members in sorted(rows.items()):
        shuffled = [members[i] for i in rng.permutation(len(members))]
        size = sampler.batch_sizes[bucket]
        batches.extend(shuffled[start : start + size] for start in range(0, len(shuffled), size))
    batches = [batches[i] for i in rng.permutation(len(batches))][offset:]
    padding = sampler.segment_steps(offset) * sampler.world_size - len(batches)
    return batches + [batches[i % len(batches)] for i in range(padding)]


@settings(max_examples=150, deadline=None)
@given(
    row_buckets=st.lists(st.sampled_from(["b0", "b1", "b2", None]), min_size=1, max_size=40).filter(
        lambda rows: any(rows)),
    batch_size=st.integers(1, 5),
    overrides=st.dictionaries(st.sampled_from(["b0", "b1", "b2"]), st.integers(1, 4)),
    world_size=st.integers(1, 5),
    seed=st.integers(0, 9),
    epoch=st.integers(0, 3),
)
def test_an_epoch_planned_as_arrays_is_the_list_of_lists_one(row_buckets, batch_size, overrides, world_size, seed,
                                                             epoch):
    sampler = BucketBatchSampler(row_buckets, batch_size, bucket_batch_sizes=overrides, seed=seed,
                                 world_size=world_size)
    for offset in range(sampler.batches_per_epoch):
        assert list(sampler.epoch_batches(epoch, offset)) == _list_epoch(sampler, row_buckets, epoch, offset)
