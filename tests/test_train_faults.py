"""cogtrain and what goes wrong around it: a validation that fails never costs the run, and what would fail
at the first validation is refused at the start, before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from cogtune.shared import store as S
from prep_helpers import encode
from train_helpers import cogtrain, losses


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
        f"cogtrain: validation at step {step} failed, training goes on: RuntimeError: CUDA out of memory. "
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
def i2v_store_without_validation_images(train_dataset, tiny_models, tmp_path_factory) -> Path:
    """An image-to-video store whose validation prompts have no images, as cogprep made them before it refused
    such a store: the images are taken out of a complete one."""
    folder = tmp_path_factory.mktemp("i2v-no-images")
    (folder / "prompts.txt").write_text("a red circle moving left to right over a blue background\n")
    image = train_dataset / (train_dataset / "videos.txt").read_text().splitlines()[0]
    (folder / "images.txt").write_text(f"{image}\n")
    store = folder / "store"
    encode(train_dataset, tiny_models["1.5-5b-i2v"], store, "--resolution", "9x48x80",
           "--validation-prompts", folder / "prompts.txt", "--validation-images", folder / "images.txt")
    tensors, metadata = S.read_extras(store)
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
