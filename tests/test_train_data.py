"""Stage 2 data: bucketed batches cover every sample once per epoch, equal steps per rank, exact resume."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
import textwrap
import time
from collections import Counter

import numpy as np
import pytest
import torch
from cogtune.shared.errors import CogtuneError
from cogtune.shared.store import ShardReader, read_sample
from cogtune.train.data import BucketBatchSampler, StoreLoader
from cogtune.train.state import TrainState, load_checkpoint_dir, save_checkpoint_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from store_builder import build_random_store

# 5 + 3 + 1 samples: batches of 2 leave partial batches in two buckets; the 1-sample bucket has batch size 1
BUCKETS = {"9x32x48": (5, 2), "5x16x16": (3, 2), "1x32x32": (1, 1)}
SAMPLES = 9
BATCHES = 3 + 2 + 1


@pytest.fixture(scope="module")
def t2v_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("t2v-store")
    return path, build_random_store(path, BUCKETS)


@pytest.fixture(scope="module")
def i2v_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("i2v-store")
    return path, build_random_store(path, BUCKETS, i2v=True, K=3)


def _sampler(rows, seed=0, rank=0, world_size=1, batch_size=2):
    sizes = {name: size for name, (_, size) in BUCKETS.items()}
    row_buckets = [row["bucket"] for row in rows]
    return BucketBatchSampler(
        row_buckets, batch_size, bucket_batch_sizes=sizes, seed=seed, rank=rank, world_size=world_size
    )


def _epoch(sampler):
    return list(itertools.islice(sampler, sampler.steps_per_epoch))


def _same_batch(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_each_epoch_covers_every_sample_once_with_partial_batches_kept(t2v_store):
    _, rows = t2v_store
    sampler = _sampler(rows)
    assert sampler.steps_per_epoch == BATCHES and sampler.repeated_batches == 0
    for _ in range(3):
        batches = _epoch(sampler)
        assert sorted(r for batch in batches for r in batch) == list(range(SAMPLES))
        for batch in batches:
            assert len({rows[r]["bucket"] for r in batch}) == 1
        sizes = Counter((rows[batch[0]]["bucket"], len(batch)) for batch in batches)
        assert sizes == {("9x32x48", 2): 2, ("9x32x48", 1): 1, ("5x16x16", 2): 1, ("5x16x16", 1): 1, ("1x32x32", 1): 1}


def test_order_depends_on_seed_and_epoch_only(t2v_store):
    _, rows = t2v_store
    first = _sampler(rows, seed=7)
    epochs = [_epoch(first) for _ in range(4)]
    again = _sampler(rows, seed=7)
    assert [_epoch(again) for _ in range(4)] == epochs
    assert len({json.dumps(e) for e in epochs}) > 1  # epochs differ in order
    # batches are shuffled across buckets, not served bucket after bucket
    bucket_orders = {tuple(rows[batch[0]]["bucket"] for batch in epoch) for epoch in epochs}
    assert len(bucket_orders) > 1
    other_seed = _sampler(rows, seed=8)
    assert [_epoch(other_seed) for _ in range(4)] != epochs


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_take_equal_steps_and_together_cover_every_sample(t2v_store, world_size):
    _, rows = t2v_store
    per_rank = [_epoch(_sampler(rows, seed=3, rank=r, world_size=world_size)) for r in range(world_size)]
    steps = _sampler(rows, world_size=world_size).steps_per_epoch
    assert all(len(batches) == steps for batches in per_rank)
    taken = [tuple(batch) for batches in per_rank for batch in batches]
    assert set(r for batch in taken for r in batch) == set(range(SAMPLES))
    repeated = steps * world_size - BATCHES
    assert _sampler(rows, world_size=world_size).repeated_batches == repeated
    # the repeats are whole batches of the epoch: distinct batches are exactly the unpadded epoch
    assert len(taken) - len(set(taken)) == repeated
    assert sum(len(b) for b in set(taken)) == SAMPLES


@settings(max_examples=60, deadline=None)
@given(
    bucket_sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    batch_size=st.integers(1, 4),
    world_size=st.integers(1, 5),
    epoch=st.integers(0, 3),
)
def test_coverage_and_equal_steps_for_any_layout(bucket_sizes, batch_size, world_size, epoch):
    row_buckets = [f"b{i}" for i, n in enumerate(bucket_sizes) for _ in range(n)]
    samplers = [
        BucketBatchSampler(row_buckets, batch_size, seed=1, rank=r, world_size=world_size) for r in range(world_size)
    ]
    steps = samplers[0].steps_per_epoch
    all_batches = samplers[0].epoch_batches(epoch)
    assert len(all_batches) == steps * world_size
    assert samplers[0].repeated_batches < world_size
    unpadded = all_batches[: samplers[0].batches_per_epoch]
    assert sorted(r for b in unpadded for r in b) == list(range(len(row_buckets)))
    assert all(len({row_buckets[r] for r in b}) == 1 and 1 <= len(b) <= batch_size for b in all_batches)
    for sampler in samplers:
        sampler.load_state_dict({**sampler.state_dict(), "epoch": epoch})
    taken = [_epoch(s) for s in samplers]
    assert all(len(t) == steps for t in taken)
    assert {r for t in taken for b in t for r in b} == set(range(len(row_buckets)))


def test_batches_have_uniform_shapes_and_hold_the_stored_tensors(t2v_store):
    path, rows = t2v_store
    loader = StoreLoader.from_store(path, batch_size=2, seed=0, prefetch=0)
    assert loader.steps_per_epoch == BATCHES  # the manifest's batch size 1 for 1x32x32 was used
    reader = ShardReader(path)
    seen = []
    for batch, _ in itertools.islice(loader, BATCHES):
        positions = batch["rows"].tolist()
        seen += positions
        frames, height, width = (int(x) for x in rows[positions[0]]["bucket"].split("x"))
        b = len(positions)
        assert batch["mean"].shape == batch["logvar"].shape == (b, 4, (frames - 1) // 4 + 1, height // 8, width // 8)
        assert batch["embedding"].shape == (b, 6, 8) and batch["mean"].dtype == torch.bfloat16
        assert "noisy" not in batch
        for i, position in enumerate(positions):
            sample = read_sample(reader, rows[position])
            assert torch.equal(batch["mean"][i], sample["mean"])
            assert torch.equal(batch["embedding"][i], sample["embedding"])
    assert sorted(seen) == list(range(SAMPLES))


def test_i2v_batches_draw_one_cached_variant_per_sample_reproducibly(i2v_store):
    path, rows = i2v_store
    reader = ShardReader(path)
    loader = StoreLoader.from_store(path, batch_size=2, seed=0, prefetch=0)
    draws = Counter()
    for batch, _ in itertools.islice(loader, 4 * BATCHES):
        b = len(batch["rows"])
        assert batch["noisy"].shape == batch["clean"].shape and batch["noisy"].shape[:3] == (b, 4, 1)
        assert batch["sigma"].shape == batch["variant"].shape == (b,)
        for i, position in enumerate(batch["rows"].tolist()):
            sample = read_sample(reader, rows[position])
            k = int(batch["variant"][i])
            assert torch.equal(batch["noisy"][i], sample["noisy"][k])
            assert torch.equal(batch["sigma"][i], sample["sigma"][k])
            assert torch.equal(batch["clean"][i], sample["clean"])
            draws[k] += 1
    assert set(draws) == {0, 1, 2}  # 36 draws from 3 variants use all of them


@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1)])
@pytest.mark.parametrize("stop_after", [2, BATCHES, BATCHES + 1])  # mid-epoch, at an epoch end, into epoch 2
def test_resume_yields_exactly_the_remaining_batches(i2v_store, world_size, rank, stop_after):
    path, _ = i2v_store
    total = 3 * BATCHES

    def loader(prefetch):
        return StoreLoader.from_store(path, batch_size=2, seed=5, rank=rank, world_size=world_size, prefetch=prefetch)

    uninterrupted = list(itertools.islice(loader(prefetch=2), total))
    first = loader(prefetch=2)
    positions = [position for _, position in itertools.islice(first, stop_after)]
    # the saved position is the one yielded with the last trained batch, whatever the thread read ahead
    assert first.state_dict() == positions[-1]
    saved = json.loads(json.dumps(positions[-1]))  # as it goes through train_state.json
    resumed = loader(prefetch=2)
    resumed.load_state_dict(saved)
    rest = list(itertools.islice(resumed, total - stop_after))
    for (batch, position), (expected, expected_position) in zip(rest, uninterrupted[stop_after:]):
        _same_batch(batch, expected)
        assert position == expected_position


def test_sampler_state_dict_after_k_batches_resumes_a_fresh_sampler(t2v_store):
    _, rows = t2v_store
    sampler = _sampler(rows, seed=2)
    expected = list(itertools.islice(_sampler(rows, seed=2), 2 * BATCHES))
    taken = list(itertools.islice(sampler, 4))
    fresh = _sampler(rows, seed=2)
    fresh.load_state_dict(sampler.state_dict())
    assert taken + list(itertools.islice(fresh, 2 * BATCHES - 4)) == expected


def test_prefetching_loader_yields_what_a_plain_one_does(i2v_store):
    path, _ = i2v_store
    plain = StoreLoader.from_store(path, batch_size=2, seed=9, prefetch=0)
    prefetching = StoreLoader.from_store(path, batch_size=2, seed=9, prefetch=3)
    for (a, pa), (b, pb) in zip(itertools.islice(plain, 2 * BATCHES), itertools.islice(prefetching, 2 * BATCHES)):
        _same_batch(a, b)
        assert pa == pb


@pytest.mark.parametrize("prefetch", [1, 3])
def test_prefetch_reads_at_most_prefetch_batches_ahead(t2v_store, prefetch):
    path, _ = t2v_store
    loader = StoreLoader.from_store(path, batch_size=2, seed=3, prefetch=prefetch)
    started, received, ahead = [], [], []
    read_batch = loader.dataset.read_batch

    def counting_read(planned):
        started.append(planned)  # counted as soon as the read begins: its batch is being built in memory
        ahead.append(len(started) - len(received))
        return read_batch(planned)

    loader.dataset.read_batch = counting_read
    batches = iter(loader)
    for _ in range(2 * BATCHES):
        received.append(next(batches))
        time.sleep(0.02)  # a slow step: the thread reads ahead as far as it may
    batches.close()
    # the caller's batch is already counted in received: the thread never builds more than `prefetch` more
    assert max(ahead) == prefetch


def test_prefetch_thread_errors_reach_the_caller(tmp_path):
    build_random_store(tmp_path, BUCKETS)
    loader = StoreLoader.from_store(tmp_path, batch_size=2, prefetch=2)
    for shard in (tmp_path / "shards" / "9x32x48").glob("*.tar"):
        shard.write_bytes(b"")  # truncated: every read of this bucket fails
    with pytest.raises(CogtuneError, match="truncated"):
        for _ in itertools.islice(loader, BATCHES):
            pass


def test_resume_refuses_a_position_from_other_settings(t2v_store):
    _, rows = t2v_store
    state = _sampler(rows, seed=1).state_dict()
    with pytest.raises(CogtuneError, match="seed"):
        _sampler(rows, seed=2).load_state_dict(state)
    with pytest.raises(CogtuneError, match="batch sizes changed"):
        # without the manifest's sizes the 1-sample bucket gets batch size 2: same batches, other layout
        BucketBatchSampler([row["bucket"] for row in rows], 2, seed=1).load_state_dict(state)
    with pytest.raises(CogtuneError, match="out of range"):
        _sampler(rows, seed=1).load_state_dict({**state, "batch": BATCHES})


@pytest.mark.parametrize(("old_world", "new_world", "steps"), [(2, 3, 1), (3, 2, 1), (1, 2, 3), (2, 1, 1), (4, 3, 2)])
def test_resume_on_another_number_of_processes_takes_the_rest_of_the_epoch_once(t2v_store, old_world, new_world,
                                                                               steps):
    """Every batch of the epoch is taken, those the old ranks had not taken by the new ranks; the only batches
    taken twice are the new world's padding (fewer than its size), as in any epoch."""
    _, rows = t2v_store
    epoch = [tuple(batch) for batch in _sampler(rows).epoch_batches(0)]  # one process: the epoch, unpadded
    taken, saved = [], None
    for rank in range(old_world):
        old = _sampler(rows, rank=rank, world_size=old_world)
        for _ in range(steps):
            taken.append(tuple(next(iter(old))))
        saved = saved or old.state_dict()  # the position is the same on every rank: rank 0's checkpoint
    new_taken = []
    for rank in range(new_world):
        new = _sampler(rows, rank=rank, world_size=new_world)
        new.load_state_dict(saved)
        new_taken += [tuple(planned.rows) for planned in itertools.takewhile(lambda p: p.epoch == 0,
                                                                              new.plan(new.position))]
    assert sorted(set(taken) | set(new_taken)) == sorted(epoch)
    assert not set(taken) & set(new_taken)  # nothing the old ranks trained is trained again
    assert len(new_taken) - len(set(new_taken)) < new_world


def test_train_state_round_trip_restores_every_generator(tmp_path):
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    state = TrainState(step=42, sampler={"epoch": 3, "batch": 1, "seed": 0}, extra={"loss_ema": 0.25})
    expected = (random.random(), np.random.rand(), torch.rand(4))
    save_checkpoint_dir(tmp_path, state)
    save_checkpoint_dir(tmp_path, TrainState(step=42), rank=1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["rng.rank1.safetensors", "rng.safetensors", "train_state.json"]  # no pickle anywhere
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    loaded = load_checkpoint_dir(tmp_path)
    assert (loaded.step, loaded.epoch, loaded.sampler, loaded.extra) == (42, 3, state.sampler, state.extra)
    loaded.rng.restore()
    assert random.random() == expected[0] and np.random.rand() == expected[1]
    assert torch.equal(torch.rand(4), expected[2])
    assert load_checkpoint_dir(tmp_path, rank=1).step == 42
    # a rank the checkpoint had not (resumed on more processes) gets no states: the caller decides
    assert load_checkpoint_dir(tmp_path, rank=2).rng is None


def test_train_state_restores_a_pending_gaussian(tmp_path):
    # both python and numpy cache the second value of a Box-Muller pair: it is part of the state
    random.seed(1), np.random.seed(1)
    random.gauss(0, 1), np.random.standard_normal()
    save_checkpoint_dir(tmp_path, TrainState())
    expected = (random.gauss(0, 1), np.random.standard_normal())
    random.seed(2), np.random.seed(2)
    load_checkpoint_dir(tmp_path).rng.restore()
    assert (random.gauss(0, 1), np.random.standard_normal()) == expected


def test_missing_or_foreign_train_state_is_a_user_error(tmp_path):
    with pytest.raises(CogtuneError, match="train_state.json: missing"):
        load_checkpoint_dir(tmp_path)
    (tmp_path / "train_state.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CogtuneError, match="not a cogtrain train state"):
        load_checkpoint_dir(tmp_path)


TORCHRUN_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from cogtune.train.data import StoreLoader

dist.init_process_group("gloo")
rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
loader = StoreLoader.from_store(sys.argv[1], batch_size=2, seed=4, rank=rank, world_size=world_size)
batches = []
for step, (batch, _) in enumerate(loader):
    if step == loader.steps_per_epoch:
        break
    batches.append(batch["rows"].tolist())
    dist.barrier()  # a rank with fewer steps would hang here
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
    json.dump(batches, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_two_ranks_take_equal_steps_and_cover_every_sample(t2v_store, tmp_path):
    path, _ = t2v_store
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(TORCHRUN_SCRIPT))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += [str(script), str(path), str(tmp_path)]
    subprocess.run(command, check=True, timeout=120, capture_output=True)
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 3  # 6 batches over 2 ranks, none repeated
    assert sorted(r for batches in per_rank for batch in batches for r in batch) == list(range(SAMPLES))
