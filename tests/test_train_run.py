"""cogtrain run end to end on tiny models: outputs, exact resume, refusals, two processes, --config files."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from cogtune.shared import store as S
from cogtune.shared.models import open_model
from cogtune.train import cli as train_cli
from cogtune.train.config import TrainConfig
from prep_helpers import add_clip
from safetensors.torch import load_file
from store_builder import build_random_store
from train_helpers import (
    assert_same_tensors,
    cogtrain,
    cogtrain_command,
    launch,
    logged_lrs,
    losses,
    scheduled_lrs,
)
from typer.testing import CliRunner


@pytest.fixture
def dataset(train_dataset) -> Path:
    return train_dataset


@pytest.fixture
def store(train_store) -> Path:
    return train_store


# ---------------------------------------------------------------------------------------------------------
# a run and what it leaves


def test_lora_run_writes_weights_checkpoints_losses_card_validation_and_summary(store, tiny_models, tmp_path):
    run = tmp_path / "run"
    result = cogtrain(store, tiny_models["5b"], run, "--max-steps", "4", "--checkpoint-every", "2",
                      "--keep-checkpoints", "1", "--validate-every", "4", "--validation-inference-steps", "2",
                      "--report-to", "tensorboard")
    assert "final loss" in result.stdout

    lora = load_file(run / "pytorch_lora_weights.safetensors")
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in lora.items()), "LoRA B starts at 0: training moves it"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000004"]  # keep 1
    checkpoint = load_file(run / "checkpoints" / "step-000004" / "model.safetensors")
    assert all("lora_" in k for k in checkpoint), "a LoRA checkpoint holds the adapter only, not the frozen model"
    logged = losses(run)
    assert sorted(logged) == [1, 2, 3, 4] and all(math.isfinite(v) for v in logged.values())
    for line in (run / "losses.jsonl").read_text().splitlines():
        entry = json.loads(line)
        assert 0 <= entry["data_wait"] < entry["step_time"]
    assert (run / "README.md").read_text().strip()
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["step-000004-0.mp4", "step-000004.png"]
    # the video is made at the bucket with the most samples (here not the first bucket, and of another size)
    from cogtune.shared.video import read_video_info

    buckets = sorted(S.Manifest.load(store).buckets, key=lambda b: b["samples"], reverse=True)
    most, first = buckets[0], S.Manifest.load(store).buckets[0]
    assert most["samples"] > buckets[1]["samples"] and most["name"] != first["name"]
    video = read_video_info(run / "validation" / "step-000004-0.mp4")
    assert (video.num_frames, video.height, video.width) == (most["frames"], most["height"], most["width"])
    assert list((run / "logs").rglob("events.out.tfevents.*"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["steps_per_rank"] == [4]
    # wall time over steps counts start-up, checkpoints and validation: the step time is the median step
    steps = [json.loads(line)["step_time"] for line in (run / "losses.jsonl").read_text().splitlines()]
    assert summary["step_time_median_s"] == round(statistics.median(steps), 4)
    assert summary["seconds_this_run"] > sum(steps)  # the wall time also holds start-up and validation
    assert f"median step {summary['step_time_median_s']:.3f} s" in result.stdout

    saved = TrainConfig.from_file(run / "config.yaml")
    assert (saved.max_steps, saved.rank, saved.mode, saved.store) == (4, 4, "lora", store)

    result = cogtrain(store, tiny_models["5b"], run, "--max-steps", "5", "--resume", "latest", "--rank", "8",
                      expect=2)
    assert "its weights do not fit this run" in result.stderr
    assert sorted(losses(run)) == [1, 2, 3, 4]


@pytest.mark.parametrize("mode", ["lora", "sft"])
def test_fp16_mixed_precision_trains(store, tiny_models, tmp_path, mode):
    run = tmp_path / "run"
    # FAST's --mixed-precision no is overridden: the last option given wins
    cogtrain(store, tiny_models["5b"], run, "--mode", mode, "--max-steps", "2", "--mixed-precision", "fp16",
             "--learning-rate", "1e-4")
    assert TrainConfig.from_file(run / "config.yaml").mixed_precision == "fp16"
    logged = losses(run)
    assert sorted(logged) == [1, 2] and all(math.isfinite(v) for v in logged.values())
    weights = (run / "pytorch_lora_weights.safetensors" if mode == "lora"
               else run / "transformer" / "diffusion_pytorch_model.safetensors")
    # trained weights stay float32 under fp16 autocast (LoRA: the adapter; sft: every weight)
    assert {tensor.dtype for tensor in load_file(weights).values()} == {torch.float32}


def test_epochs_set_the_step_count_and_the_lr_schedule_follows_it(store, tiny_models, tmp_path):
    from cogtune.train.data import StoreLoader

    run = tmp_path / "run"
    # two micro-batches per optimizer step: the schedule moves once per optimizer step, not per batch
    cogtrain(store, tiny_models["5b"], run, "--epochs", "2", "--batch-size", "1", "--gradient-accumulation-steps",
             "2", "--lr-scheduler", "cosine", "--lr-warmup-steps", "2", "--learning-rate", "1e-3")
    batches_per_epoch = StoreLoader.from_store(store, 1).steps_per_epoch
    steps = 2 * math.ceil(batches_per_epoch / 2)
    assert steps >= 4
    assert sorted(losses(run)) == list(range(1, steps + 1))
    assert logged_lrs(run) == pytest.approx(scheduled_lrs("cosine", 1e-3, 2, steps))


# ---------------------------------------------------------------------------------------------------------
# exact resume


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "options", "weights"),
    [
        # dropout in the LoRA and on captions: resume must restore the global generators and the per-step ones
        # (and the recompute of offloaded checkpoints must draw the LoRA dropout as the forward did)
        ("lora", ("--lora-dropout", "0.1", "--caption-dropout", "0.5", "--offload-checkpoints"),
         "pytorch_lora_weights.safetensors"),
        ("sft", ("--batch-size", "1", "--gradient-accumulation-steps", "2", "--learning-rate", "1e-5",
                 "--no-gradient-checkpointing"), "transformer/diffusion_pytorch_model.safetensors"),
    ],
)
def test_resume_reproduces_the_uninterrupted_run(store, tiny_models, tmp_path, mode, options, weights):
    model = tiny_models["5b"]
    common = ("--mode", mode, "--checkpoint-every", "3", "--keep-checkpoints", "0", *options)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    # LoRA validates in the uninterrupted run only: validation must not change what training draws
    validation = ("--validate-every", "3", "--validation-inference-steps", "1") if mode == "lora" else ()
    cogtrain(store, model, whole, "--max-steps", "6", *common, *validation)
    cogtrain(store, model, resumed, "--max-steps", "3", *common)
    cogtrain(store, model, resumed, "--max-steps", "6", "--resume", "latest", *common)

    if validation:
        assert sorted(p.name for p in (whole / "validation").iterdir()) == [
            "step-000003-0.mp4", "step-000003.png", "step-000006-0.mp4", "step-000006.png"]
    assert sorted(losses(resumed)) == [1, 2, 3, 4, 5, 6]
    assert losses(resumed) == losses(whole)
    assert_same_tensors(whole / weights, resumed / weights)
    for step in ("step-000003", "step-000006"):
        assert_same_tensors(whole / "checkpoints" / step / "model.safetensors",
                            resumed / "checkpoints" / step / "model.safetensors")


def test_resume_from_an_explicit_checkpoint_retrains_what_followed_it(store, tiny_models, tmp_path):
    run, model = tmp_path / "run", tiny_models["5b"]
    cogtrain(store, model, run, "--max-steps", "2", "--checkpoint-every", "1", "--keep-checkpoints", "2")
    first = losses(run)
    # not the latest checkpoint (step 2): the one named
    cogtrain(store, model, run, "--max-steps", "3", "--checkpoint-every", "1", "--keep-checkpoints", "2",
             "--resume", str(run / "checkpoints" / "step-000001"))
    again = losses(run)
    assert json.loads((run / "summary.json").read_text())["steps_this_run"] == 2  # steps 2 and 3, not 3 alone
    assert sorted(again) == [1, 2, 3]
    assert again[1] == first[1] and again[2] == first[2]  # step 2 trained again from step 1's state, the same


@pytest.mark.slow
@pytest.mark.parametrize(("optimizer", "module"), [("adamw8bit", "bitsandbytes"), ("prodigy", "prodigyopt")])
def test_optional_optimizers_train_and_resume_exactly(store, tiny_models, tmp_path, optimizer, module):
    """The optional extras' optimizers (pip install cogtune[bnb,prodigy]; CI installs both): their state goes
    through the checkpoint (no pickle: weights_only loading) and comes back exactly."""
    pytest.importorskip(module)
    model = tiny_models["5b"]
    lr = ("--learning-rate", "1.0") if optimizer == "prodigy" else ()  # Prodigy's lr is a multiplier of its own
    common = ("--optimizer", optimizer, "--checkpoint-every", "2", "--keep-checkpoints", "0", *lr)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    cogtrain(store, model, whole, "--max-steps", "4", *common)
    cogtrain(store, model, resumed, "--max-steps", "2", *common)
    cogtrain(store, model, resumed, "--max-steps", "4", "--resume", "latest", *common)
    assert losses(resumed) == losses(whole)
    assert_same_tensors(whole / "pytorch_lora_weights.safetensors", resumed / "pytorch_lora_weights.safetensors")
    trained = load_file(whole / "pytorch_lora_weights.safetensors")
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in trained.items()), f"{optimizer} moved nothing"


# ---------------------------------------------------------------------------------------------------------
# refusals: exit 2, one line, nothing written


def assert_refused(result, out: Path, words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert words in lines[0], lines[0]
    assert not out.exists(), f"a refused run wrote {sorted(p.name for p in out.iterdir())}"


@pytest.fixture
def model_with_other_vae_config(tiny_models, tmp_path) -> Path:
    """The tiny 5b with one VAE config value changed: same variant, but not the VAE the store was made with."""
    path = shutil.copytree(tiny_models["5b"], tmp_path / "other-vae")
    config_file = path / "vae" / "config.json"
    config = json.loads(config_file.read_text())
    config["force_upcast"] = not config.get("force_upcast", True)
    config_file.write_text(json.dumps(config))
    return path


def test_refuses_an_option_whose_package_is_missing(store, tiny_models, tmp_path, monkeypatch):
    import importlib.util

    from cogtune.train import checks

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(checks, "find_spec", lambda name: None if name == "wandb" else real_find_spec(name))
    out = tmp_path / "run"
    result = cogtrain(store, tiny_models["5b"], out, "--max-steps", "1", "--report-to", "wandb", expect=2)
    assert_refused(result, out, "--report-to wandb needs the wandb package: pip install 'cogtune[wandb]'")


def test_refuses_a_lora_target_that_names_no_module(store, tiny_models, tmp_path):
    out = tmp_path / "run"
    # to_q and to_v exist: peft alone would train those two and skip the typo without a word
    result = cogtrain(store, tiny_models["5b"], out, "--max-steps", "1", "--target-modules", "to_q,to_kk,to_v",
                      expect=2)
    assert_refused(result, out, "--target-modules to_kk: no module of the transformer is called that")


def test_refuses_a_store_made_with_another_variant(store, tiny_models, tmp_path):
    out = tmp_path / "run"
    result = cogtrain(store, tiny_models["2b"], out, "--max-steps", "1", expect=2)
    assert_refused(result, out, "store made with another model")


def test_refuses_a_store_made_with_another_vae_config(store, model_with_other_vae_config, tmp_path):
    out = tmp_path / "run"
    result = cogtrain(store, model_with_other_vae_config, out, "--max-steps", "1", expect=2)
    assert_refused(result, out, "its vae config differs")


def test_refuses_a_stale_dataset_unless_allowed(store, dataset, tiny_models, tmp_path):
    edited = shutil.copytree(dataset, tmp_path / "edited")
    add_clip(edited, "extra.mp4", "a green square moving up over a black background", frames=20)
    out = tmp_path / "run"
    result = cogtrain(store, tiny_models["5b"], out, "--max-steps", "1", "--dataset", edited, expect=2)
    assert_refused(result, out, "dataset changed since the store was encoded (1 new, 0 changed, 0 removed)")

    cogtrain(store, tiny_models["5b"], out, "--max-steps", "1", "--dataset", edited, "--allow-stale")
    assert sorted(losses(out)) == [1]


@pytest.mark.parametrize("other", ["9x32x32", "17x32x48", "1x32x48"])
def test_refuses_a_learned_positional_model_off_its_native_size(tiny_models, tmp_path, other):
    """A 5b-I2V store with a bucket beside the native 9x32x48 of another width, frame count (diffusers would
    silently swap the learned table for a sin-cos one) or an image's 1 frame: cogprep refuses to make one, so it
    is built by hand, its manifest naming the tiny 5b-I2V model as it would."""
    model = tiny_models["5b-i2v"]
    store = tmp_path / "store"
    build_random_store(store, {"9x32x48": (2, 2), other: (2, 2)}, i2v=True)
    manifest = S.Manifest.load(store)
    manifest.model = {"source": str(model), "variant": "CogVideoX-5b-I2V",
                      "configs": open_model(model).config_fingerprint(("vae", "text_encoder"))}
    manifest.save(store)
    out = tmp_path / "run"
    result = cogtrain(store, model, out, "--max-steps", "1", expect=2)
    assert_refused(result, out, f"{store}: bucket {other}: CogVideoX-5b-I2V has learned positional embeddings "
                                "that exist only at its native 9x32x48")


def test_refuses_a_used_run_folder_without_resume(store, tiny_models, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("max_steps: 1\n")
    result = cogtrain(store, tiny_models["5b"], out, "--max-steps", "1", expect=2)
    assert "already holds a run: pass --resume latest" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


# ---------------------------------------------------------------------------------------------------------
# two processes


@pytest.mark.slow
def test_two_processes_take_the_same_steps_and_end_with_the_same_weights(store, tiny_models, tmp_path):
    run = tmp_path / "run"
    launch(cogtrain_command(store, tiny_models["5b"], run, "--max-steps", "3", "--checkpoint-every", "2",
                            "--lr-scheduler", "linear", "--lr-warmup-steps", "2", "--learning-rate", "1e-3",
                            processes=2))

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps_per_rank"] == [3, 3]
    first, second = summary["trained_weights_sha256_per_rank"]
    assert first == second
    assert sorted(losses(run)) == [1, 2, 3]
    # the schedule a single process would follow, though accelerate steps it once per process
    assert logged_lrs(run) == pytest.approx(scheduled_lrs("linear", 1e-3, 2, 3))
    for checkpoint in ("step-000002", "step-000003"):  # each rank's own generator states
        names = {p.name for p in (run / "checkpoints" / checkpoint).iterdir()}
        assert {"rng.safetensors", "rng.rank1.safetensors", "train_state.json", "model.safetensors"} <= names
        assert not [name for name in names if name.endswith(".pkl")]  # nothing a resume would unpickle


# ---------------------------------------------------------------------------------------------------------
# --config files


@pytest.fixture
def captured(monkeypatch) -> list[TrainConfig]:
    """Configs the CLI would train with, without training."""
    seen: list[TrainConfig] = []
    monkeypatch.setattr("cogtune.train.trainer.train", seen.append)
    return seen


def test_config_file_mirrors_the_options_and_the_command_line_wins(captured, tmp_path):
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump({
        "store": "s", "model": "m", "out": "o", "learning-rate": 3e-4, "rank": 8,
        "target_modules": ["to_q", "to_v"], "max_steps": 5, "gradient_checkpointing": False,
    }))
    result = CliRunner().invoke(train_cli.app, ["run", "--config", str(config_file), "--max-steps", "2"])
    assert result.exit_code == 0, result.output
    (config,) = captured
    assert (config.learning_rate, config.rank, config.target_modules) == (3e-4, 8, ["to_q", "to_v"])
    assert config.max_steps == 2  # the command line wins
    assert config.gradient_checkpointing is False
    assert (config.store, config.model, config.out) == (Path("s"), "m", Path("o"))


def test_saved_config_round_trips_through_config_and_from_file(captured, tmp_path):
    argv = ["run", "--store", "s", "--model", "m", "--out", "o", "--mode", "sft", "--target-modules", "to_q,to_k",
            "--lora-alpha", "2", "--resume", "latest", "--dataset", "d", "--no-gradient-checkpointing"]
    assert CliRunner().invoke(train_cli.app, argv).exit_code == 0
    original = captured.pop()
    saved = original.save(tmp_path)
    assert CliRunner().invoke(train_cli.app, ["run", "--config", str(saved)]).exit_code == 0
    assert captured.pop() == original
    assert TrainConfig.from_file(saved) == original


def test_unknown_config_keys_are_refused(tmp_path):
    config_file = tmp_path / "train.yaml"
    config_file.write_text("store: s\nmodel: m\nout: o\nlearning_rat: 1\n")
    result = CliRunner().invoke(train_cli.app, ["run", "--config", str(config_file)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {config_file}: unknown option(s) learning_rat"]


def test_an_unreadable_config_file_is_one_line_and_exit_2(tmp_path):
    config_file = tmp_path / "train.yaml"
    config_file.write_text("store: [unclosed\n")
    result = CliRunner().invoke(train_cli.app, ["run", "--config", str(config_file)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {config_file}: not a valid config file"), lines


@pytest.mark.slow
def test_image_to_video_1_5_lora_run_from_a_real_store_loads_into_the_i2v_pipeline(i2v_train_store, tiny_models,
                                                                                   tmp_path):
    """The 1.5-I2V path end to end: cogprep caches first-frame latents (clean + noise-augmented) and a validation
    image (the session's `i2v_train_store`: the first clip's first frame); cogtrain trains on them (ofs, odd latent
    frames padded, image conditioning) and renders validation; the LoRA loads into CogVideoXImageToVideoPipeline
    and changes what it generates."""
    import numpy as np
    import PIL.Image
    from cogtune.shared.video import read_video_info
    from diffusers import CogVideoXImageToVideoPipeline

    model, store = tiny_models["1.5-5b-i2v"], i2v_train_store
    image = store.parent / "first.png"
    row = S.read_index(store)[0]
    assert row["image_offset"] >= 0  # the store holds image latents

    run = tmp_path / "run"
    cogtrain(store, model, run, "--max-steps", "3", "--learning-rate", "1e-2", "--validate-every", "3",
             "--validation-inference-steps", "2", "--lora-alpha", "8")
    assert all(math.isfinite(loss) for loss in losses(run).values()) and len(losses(run)) == 3
    videos = sorted((run / "validation").glob("*.mp4"))
    assert videos and read_video_info(videos[0])[1:] == (16.0, 48, 80)  # the variant's fps, the bucket's size

    def generate(pipe) -> torch.Tensor:
        return pipe(image=PIL.Image.open(image), prompt="a red circle moving left to right over a blue background",
                    num_frames=9, height=48, width=80, num_inference_steps=2, guidance_scale=1.0,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).frames

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(model)
    base = generate(pipe)
    pipe.load_lora_weights(run)
    tuned = generate(pipe)
    assert base.shape == tuned.shape == (1, 4, 16, 6, 10)  # 3 latent frames padded to 4 for 1.5
    assert not np.allclose(base.numpy(), tuned.numpy())


@pytest.mark.parametrize(("user_settings", "seen"), [(None, "expandable_segments:True"),
                                                      ("max_split_size_mb:128", "max_split_size_mb:128")])
def test_runs_use_expandable_cuda_segments_unless_the_user_chose_settings(monkeypatch, tmp_path, user_settings,
                                                                          seen):
    """What PYTORCH_CUDA_ALLOC_CONF holds when `train` takes its first step (a check or the accelerator, whichever
    comes first: from then on the store, the model or CUDA may be touched)."""
    from cogtune.train import trainer

    if user_settings is None:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", user_settings)

    class FirstStep(Exception):
        pass

    def first_step(*args):
        raise FirstStep(os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))

    for name in ("check_run_paths", "check_run", "make_accelerator"):
        monkeypatch.setattr(trainer, name, first_step, raising=name != "check_run_paths")
    with pytest.raises(FirstStep) as stopped:
        trainer.train(TrainConfig(store=tmp_path / "store", model="m", out=tmp_path / "run"))
    assert stopped.value.args == (seen,)


def test_pytorch_reads_the_allocator_settings_set_after_it_was_imported(tmp_path):
    """cogtrain imports torch before `train` sets PYTORCH_CUDA_ALLOC_CONF: PyTorch must read the variable at its
    allocator's first use, not at import. Its allocator settings are read back in a fresh process (the CPU build
    parses them as a CUDA build does)."""
    import subprocess
    import sys

    from cogtune.train.trainer import CUDA_ALLOCATOR

    code = ("import os, torch\n"
            f"os.environ['PYTORCH_CUDA_ALLOC_CONF'] = {CUDA_ALLOCATOR!r}\n"
            "print(torch._C._accelerator_getAllocatorSettings())")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == CUDA_ALLOCATOR == "expandable_segments:True"
