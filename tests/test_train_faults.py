"""cogtrain and what goes wrong around it: a validation that fails never costs the run, and what would fail
at the first validation is refused at the start, before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cogtune.shared import store as S
from prep_helpers import encode
from train_helpers import cogtrain, cogtrain_command, launch, losses


def test_a_failing_validation_is_one_line_and_the_run_goes_on(train_store, tiny_models, tmp_path, monkeypatch):
    from cogtune.train import validation

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(validation, "run_validation", out_of_memory)
    run = tmp_path / "run"
    result = cogtrain(train_store, tiny_models["5b"], run, "--max-steps", "4", "--validate-every", "2",
                      "--checkpoint-every", "2")
    failures = [line for line in result.stderr.splitlines() if "validation at step" in line]
    assert failures == [
        f"cogtrain: warning: validation at step {step} failed, training goes on: RuntimeError: CUDA out of memory. "
        "Tried to allocate 20.00 GiB" for step in (2, 4)
    ]
    assert sorted(losses(run)) == [1, 2, 3, 4]
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "checkpoints" / "step-000004" / "train_state.json").is_file()


def test_the_last_validation_runs_after_the_weights_are_written(train_store, tiny_models, tmp_path, monkeypatch):
    from cogtune.train import validation

    seen = []
    monkeypatch.setattr(validation, "run_validation", lambda *args, **kwargs: seen.append(
        (args[4], (args[3] / "pytorch_lora_weights.safetensors").exists())))
    cogtrain(train_store, tiny_models["5b"], tmp_path / "run", "--max-steps", "4", "--validate-every", "2")
    assert seen == [(2, False), (4, True)]  # (step, weights on disk when it started)


@pytest.fixture(scope="module")
def i2v_store_without_validation_images(i2v_train_store, tmp_path_factory) -> Path:
    """An image-to-video store whose validation prompts have no images, as cogprep made them before it refused
    such a store: the images are taken out of a copy of a complete one."""
    store = shutil.copytree(i2v_train_store, tmp_path_factory.mktemp("i2v-no-images") / "store")
    tensors, metadata = S.read_extras(store)
    assert any(name.startswith("validation_image_") for name in tensors)  # there were images to take out
    S.write_extras(store, {k: v for k, v in tensors.items() if not k.startswith("validation_image_")}, metadata)
    return store


def test_an_i2v_store_without_validation_images_is_refused_before_training(i2v_store_without_validation_images,
                                                                          tiny_models, tmp_path):
    run = tmp_path / "run"
    result = cogtrain(i2v_store_without_validation_images, tiny_models["1.5-5b-i2v"], run, "--max-steps", "2",
                      "--validate-every", "1", expect=2)
    assert result.stderr.strip() == (
        f"error: {i2v_store_without_validation_images}: an image-to-video model needs one validation image per "
        "validation prompt, 1 of 1 missing (re-run cogprep encode with --validation-images)")
    assert not run.exists()
    # without validation, the same store trains
    cogtrain(i2v_store_without_validation_images, tiny_models["1.5-5b-i2v"], run, "--max-steps", "1")
    assert sorted(losses(run)) == [1]


def test_cogprep_refuses_i2v_validation_prompts_without_images(train_dataset, tiny_models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    store = tmp_path / "store"
    result = encode(train_dataset, tiny_models["1.5-5b-i2v"], store, "--resolution", "9x48x80",
                    "--validation-prompts", prompts, expect=2)
    assert result.stderr.strip() == (
        f"error: {prompts}: an image-to-video model needs a validation image per prompt: pass --validation-images "
        "FILE (one image path per line)")
    assert not store.exists()


# ---------------------------------------------------------------------------------------------------------
# a damaged store


@pytest.fixture
def damaged_store(train_store, tmp_path) -> tuple[Path, dict, int]:
    """A copy of the trainer tests' store with 8 bytes flipped inside one sample's cached latent: of the samples
    that share their bucket with another (which --on-damaged skip can train in its place), the last the first
    epoch takes (batch size 1, seed 0). Returns the store and that sample's index row."""
    from cogtune.train.data import BucketBatchSampler, StoreDataset

    store = shutil.copytree(train_store, tmp_path / "store")
    buckets = StoreDataset(store).row_buckets
    order = [batch[0] for batch in BucketBatchSampler(buckets, 1, seed=0).epoch_batches(0)]
    shared = [i for i in order if buckets.count(buckets[i]) > 1]
    assert shared, "the store has no bucket of two samples"
    row = S.read_index(store)[shared[-1]]
    steps_before = order.index(shared[-1])
    with open(store / row["shard"], "r+b") as f:
        f.seek(row["latent_offset"] + row["latent_size"] // 2)
        data = f.read(8)
        f.seek(-8, 1)
        f.write(bytes(b ^ 0xFF for b in data))
    return store, row, steps_before


def test_a_damaged_sample_stops_the_run_in_one_line_naming_shard_sample_and_source(damaged_store, tiny_models,
                                                                                    tmp_path):
    store, row, steps_before = damaged_store
    run = tmp_path / "run"
    result = cogtrain(store, tiny_models["5b"], run, "--max-steps", "8", "--checkpoint-every", "1", "--batch-size", "1",
                      expect=2)
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1, result.stderr
    assert line.startswith(f"error: {store / row['shard']}: sample {row['key']} (source {row['source']}) is damaged ("), line
    assert line.endswith(f"run cogprep verify {store}, then cogprep encode; or train on with --on-damaged skip")
    assert not (run / "pytorch_lora_weights.safetensors").exists()
    # what was trained before it is kept: the steps before the damaged sample, each checkpointed
    assert sorted(losses(run) if steps_before else []) == list(range(1, steps_before + 1))
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if checkpoints.is_dir()) == [
        f"step-{step:06d}" for step in range(1, steps_before + 1)]


def test_on_damaged_skip_trains_another_sample_of_its_bucket_and_names_the_damaged_one(damaged_store, tiny_models,
                                                                                       tmp_path):
    store, row, steps_before = damaged_store
    run = tmp_path / "run"
    result = cogtrain(store, tiny_models["5b"], run, "--max-steps", "8", "--on-damaged", "skip", "--batch-size", "2")
    assert sorted(losses(run)) == list(range(1, 9))  # every step taken, every batch full
    summary = json.loads((run / "summary.json").read_text())
    assert [(d["key"], d["source"]) for d in summary["damaged_samples_skipped"]] == [(row["key"], row["source"])]
    assert f"cogtrain: skipped damaged sample {row['key']} (source {row['source']})" in result.stderr
    assert "skipped 1 damaged samples (listed in summary.json)" in result.stderr


@pytest.mark.slow
def test_on_damaged_skip_under_two_processes_keeps_every_rank_in_step(damaged_store, tiny_models, tmp_path):
    store, row, steps_before = damaged_store
    run = tmp_path / "run"
    launch(cogtrain_command(store, tiny_models["5b"], run, "--max-steps", "6", "--on-damaged", "skip", processes=2))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps_per_rank"] == [6, 6]
    assert [d["key"] for d in summary["damaged_samples_skipped"]] == [row["key"]]


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_missing_or_short_shard_is_refused_before_any_step(train_store, tiny_models, tmp_path, damage):
    store = shutil.copytree(train_store, tmp_path / "store")
    shard = store / S.read_index(store)[0]["shard"]
    needed = shard.stat().st_size  # the last member ends at the tar's padding, at most
    if damage == "deleted":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:600])
    run = tmp_path / "run"
    result = cogtrain(store, tiny_models["5b"], run, "--max-steps", "1", expect=2)
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith(f"error: {shard}: "), line
    assert ("missing (the index needs " if damage == "deleted" else "truncated: 600 bytes, the index needs ") in line
    assert line.endswith(f"run cogprep verify {store}, then cogprep encode to re-encode its samples")
    assert int(line.split("the index needs ")[1].split()[0].rstrip("):")) <= needed
    assert not run.exists()
