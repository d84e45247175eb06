"""Training outputs load where users load them: LoRA and full weights into fresh diffusers pipelines, validation
videos from a real cogprep store, a model card whose snippet names the right pipeline."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import yaml
from accelerate.utils import DistributedType
from cogtune.shared.demo import make_demo_dataset
from cogtune.shared.models import open_model
from cogtune.shared.store import Manifest, write_extras
from cogtune.shared.video import read_frames, read_video_info
from cogtune.shared.zoo import TINY_NATIVE
from cogtune.train.config import TrainConfig
from cogtune.train.math import (
    TrainBatch,
    ofs_tensor,
    padded_frame_count,
    rotary_embeddings,
    training_step,
)
from cogtune.train.outputs import (
    LORA_WEIGHT_NAME,
    save_full,
    save_lora,
    write_model_card,
)
from cogtune.train.validation import run_validation
from diffusers import CogVideoXTransformer3DModel
from peft import LoraConfig
from PIL import Image
from prep_helpers import encode
from safetensors import safe_open
from safetensors.torch import save_file

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK, ALPHA = 4, 8  # alpha != rank: a loader that assumes alpha = rank gets half the trained strength


def wrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a data-parallel wrapper, as accelerate prepares it (DataParallel: no process group
    needed on the CPU; accelerate unwraps it as it unwraps DDP)."""
    return torch.nn.DataParallel(module)


def latent_size(model) -> tuple[int, int, int]:
    frames, height, width = TINY_NATIVE[model.variant.generation]
    return (frames - 1) // 4 + 1, height // 8, width // 8


def train_a_little(transformer, model, steps: int = 2) -> None:
    """A few AdamW steps of the real training math on random latents, so every trainable weight moves."""
    variant = model.variant
    scheduler = model.load_scheduler()
    frames, h, w = latent_size(model)
    g = torch.Generator().manual_seed(0)
    batch = TrainBatch(
        latent_mean=torch.randn(1, 16, frames, h, w, generator=g),
        latent_logvar=torch.full((1, 16, frames, h, w), -4.0),
        prompt_embeds=torch.randn(1, 226, 16, generator=g),
        image_latents=torch.randn(1, 16, 1, h, w, generator=g) if variant.task == "i2v" else None,
    )
    optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=1e-2)
    transformer.train()
    for _ in range(steps):
        loss = training_step(
            transformer, scheduler, batch, vae_scaling_factor=variant.vae_scaling_factor,
            invert_scale_latents=variant.invert_scale_latents, generator=g,
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def forward(transformer, model) -> torch.Tensor:
    """The transformer's prediction on fixed inputs of the tiny native size, as the pipelines call it."""
    config = transformer.config
    frames, h, w = latent_size(model)
    frames = padded_frame_count(frames, config.patch_size_t)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, frames, config.in_channels, h, w, generator=g),
            encoder_hidden_states=torch.randn(1, 226, 16, generator=g),
            timestep=torch.tensor([500]),
            ofs=ofs_tensor(config, 1, "cpu", torch.float32),
            image_rotary_emb=rotary_embeddings(config, h, w, frames, "cpu"),
            return_dict=False,
        )[0]


def lora_layers(transformer) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in transformer.named_modules() if hasattr(m, "lora_A") and m.lora_A}


def merged_weights(transformer, adapter: str, scale: float) -> dict[str, torch.Tensor]:
    """W + B @ A * scale for every LoRA layer, computed from the peft parameters."""
    return {
        name: (m.base_layer.weight + m.lora_B[adapter].weight @ m.lora_A[adapter].weight * scale).detach()
        for name, m in lora_layers(transformer).items()
    }


def fused_weights(pipe, names) -> dict[str, torch.Tensor]:
    """The transformer's weights after ``fuse_lora``: the LoRA folded into each layer's base weight."""
    pipe.fuse_lora()
    return {name: pipe.transformer.get_submodule(name).base_layer.weight.detach() for name in names}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------------
# LoRA


@pytest.fixture(scope="module", params=["5b", "1.5-5b-i2v"])
def trained_lora(request, tiny_models, tmp_path_factory):
    """(model, trained transformer with a LoRA, run folder with the saved LoRA)."""
    model = open_model(tiny_models[request.param])
    transformer = model.load_transformer()
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=True))
    train_a_little(transformer, model)
    assert all(m.lora_B["default"].weight.abs().sum() > 0 for m in lora_layers(transformer).values())
    run = tmp_path_factory.mktemp("lora-run")
    saved = save_lora(wrapped(transformer), run, rank=RANK, alpha=ALPHA, target_modules=TARGETS)
    assert saved == run / LORA_WEIGHT_NAME
    return model, transformer, run


def test_lora_loads_into_a_fresh_pipeline_with_the_trained_strength(trained_lora):
    model, trained, run = trained_lora
    expected = merged_weights(trained, "default", ALPHA / RANK)
    pipe = model.pipeline_class().from_pretrained(model.path)
    base_output = forward(pipe.transformer, model)
    pipe.load_lora_weights(run, adapter_name="cogtune")

    loaded_output = forward(pipe.transformer, model)
    torch.testing.assert_close(loaded_output, forward(trained, model), rtol=0, atol=1e-5)
    assert not torch.allclose(loaded_output, base_output, atol=1e-3)
    assert_same_weights(fused_weights(pipe, expected.keys()), expected)


def test_lora_file_holds_float32_diffusers_keys_and_no_staging_leftovers(trained_lora):
    _, trained, run = trained_lora
    with safe_open(str(run / LORA_WEIGHT_NAME), framework="pt") as f:
        keys = list(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float32 for k in keys)
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert len(keys) == 2 * len(lora_layers(trained))
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert metadata["transformer.r"] == RANK and metadata["transformer.lora_alpha"] == ALPHA
    assert sorted(metadata["transformer.target_modules"]) == sorted(TARGETS)
    assert [p.name for p in run.iterdir()] == [LORA_WEIGHT_NAME]
    assert (run / LORA_WEIGHT_NAME).stat().st_mode & 0o044  # not the owner-only mode safetensors creates


def test_without_the_metadata_the_same_weights_load_at_the_wrong_strength(trained_lora, tmp_path):
    """Why the metadata matters: stripped of it, diffusers assumes alpha = rank and the LoRA loads at half strength."""
    model, trained, run = trained_lora
    with safe_open(str(run / LORA_WEIGHT_NAME), framework="pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(tmp_path / LORA_WEIGHT_NAME), metadata={"format": "pt"})
    pipe = model.pipeline_class().from_pretrained(model.path)
    pipe.load_lora_weights(tmp_path, adapter_name="cogtune")

    loaded = fused_weights(pipe, lora_layers(trained).keys())
    trained_merged = merged_weights(trained, "default", ALPHA / RANK)
    assert all(not torch.allclose(loaded[n], trained_merged[n], atol=1e-4) for n in loaded)
    assert_same_weights(loaded, merged_weights(trained, "default", 1.0))


def test_save_lora_refuses_settings_that_differ_from_the_adapter(trained_lora, tmp_path):
    _, trained, _ = trained_lora
    with pytest.raises(ValueError, match="alpha"):
        save_lora(trained, tmp_path, rank=RANK, alpha=RANK, target_modules=TARGETS)
    assert not any(tmp_path.iterdir())


def test_save_lora_from_gathered_weights_writes_them_not_the_local_shard(trained_lora, tmp_path):
    """Under FSDP or ZeRO-3 a rank's parameters are a shard; the run passes the weights gathered whole."""
    _, trained, run = trained_lora
    gathered = {k: v.clone() for k, v in trained.state_dict().items()}
    shard_like = copy.deepcopy(trained)
    with torch.no_grad():
        for parameter in shard_like.parameters():
            parameter.zero_()
    save_lora(shard_like, tmp_path, rank=RANK, alpha=ALPHA, target_modules=TARGETS, state_dict=gathered)
    # the same tensors and metadata (not the same bytes: safetensors writes its metadata map in no fixed order)
    with safe_open(str(tmp_path / LORA_WEIGHT_NAME), framework="pt") as ours, \
            safe_open(str(run / LORA_WEIGHT_NAME), framework="pt") as expected:
        assert ours.metadata() == expected.metadata()
        assert sorted(ours.keys()) == sorted(expected.keys())
        for key in expected.keys():
            assert torch.equal(ours.get_tensor(key), expected.get_tensor(key)), key


# ---------------------------------------------------------------------------------------------------------
# full fine-tune


def test_full_transformer_round_trips_and_runs_in_the_pipeline(tiny_models, tmp_path):
    model = open_model(tiny_models["5b"])
    transformer = model.load_transformer()
    train_a_little(transformer, model, steps=1)
    save_full(wrapped(transformer), tmp_path)
    train_a_little(transformer, model, steps=1)  # saving again must replace the folder whole
    folder = save_full(transformer, tmp_path)

    assert folder == tmp_path / "transformer" and [p.name for p in tmp_path.iterdir()] == ["transformer"]
    loaded = CogVideoXTransformer3DModel.from_pretrained(folder)
    trained_state = transformer.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trained_state[name]), name
    pipe = model.pipeline_class().from_pretrained(model.path, transformer=loaded)
    video = pipe(prompt="a red circle", num_frames=9, height=32, width=32, num_inference_steps=2,
                 output_type="np").frames
    assert video.shape == (1, 9, 32, 32, 3) and np.isfinite(video).all()

    # from weights gathered whole (FSDP, ZeRO-3), where the rank's own parameters are a shard: the same folder
    shard_like = copy.deepcopy(transformer)
    with torch.no_grad():
        for parameter in shard_like.parameters():
            parameter.zero_()
    gathered = save_full(shard_like, tmp_path / "gathered", state_dict=trained_state)
    assert sorted(p.name for p in gathered.iterdir()) == sorted(p.name for p in folder.iterdir())
    for name, tensor in CogVideoXTransformer3DModel.from_pretrained(gathered).state_dict().items():
        assert torch.equal(tensor, trained_state[name]), name


# ---------------------------------------------------------------------------------------------------------
# validation


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory):
    """One demo clip, two validation prompts, and a first-frame image for each (for I2V)."""
    path = tmp_path_factory.mktemp("demo")
    make_demo_dataset(path, count=1, seed=3)
    (path / "validation.txt").write_text("a red circle moving left to right\na blue square moving up\n")
    for i, colour in enumerate([(200, 30, 30), (30, 60, 220)]):
        Image.new("RGB", (40, 28), colour).save(path / f"first_{i}.png")
    (path / "validation_images.txt").write_text("first_0.png\nfirst_1.png\n")
    return path


def encoded_store(dataset, model_path, out, *extra):
    """A real cogprep store of the demo clip at the tiny 1.0 native size, with the validation prompts."""
    frames, height, width = TINY_NATIVE["1.0"]
    encode(dataset, model_path, out, "--resolution", f"{frames}x{height}x{width}",
           "--validation-prompts", dataset / "validation.txt", *extra)
    return out


@pytest.fixture(scope="module")
def t2v_validation_store(tiny_models, demo_dataset, tmp_path_factory):
    """`encoded_store` on the tiny 5b, encoded once for the module and shared read-only."""
    return encoded_store(demo_dataset, tiny_models["5b"], tmp_path_factory.mktemp("t2v") / "store")


def assert_videos(paths, out_dir, step, size):
    """Two prompts: two videos, then the round's contact sheet (a row of 4 frames per prompt, a caption above)."""
    from PIL import Image

    videos, sheet = paths[:-1], paths[-1]
    assert videos == [out_dir / "validation" / f"step-{step:06d}-{i}.mp4" for i in range(2)]
    for path in videos:
        info = read_video_info(path)
        assert (info.num_frames, info.height, info.width) == size
    assert sheet == out_dir / "validation" / f"step-{step:06d}.png"
    assert Image.open(sheet).size == (4 * size[2], 2 * (size[1] + 16))


def test_validation_renders_text_to_video_from_the_store(tiny_models, t2v_validation_store, tmp_path):
    model, store = open_model(tiny_models["5b"]), t2v_validation_store
    transformer = model.load_transformer().train()
    args = dict(device="cpu", dtype=torch.float32, seed=5, num_inference_steps=2, num_frames=9, height=32, width=32)

    first = run_validation(transformer, model, store, tmp_path / "run", 1, **args)
    second = run_validation(transformer, model, store, tmp_path / "run", 20, **args)
    assert_videos(first, tmp_path / "run", 1, (9, 32, 32))
    assert_videos(second, tmp_path / "run", 20, (9, 32, 32))
    assert read_video_info(first[0]).fps == model.variant.fps
    assert transformer.training
    # fixed noise: unchanged weights give the same video at every step, so steps can be compared
    assert np.array_equal(read_frames(first[0], range(9)), read_frames(second[0], range(9)))
    assert not np.array_equal(read_frames(first[0], range(9)), read_frames(first[1], range(9)))


def test_validation_on_a_rank_that_does_not_write_generates_and_writes_nothing(tiny_models, t2v_validation_store,
                                                                               tmp_path, monkeypatch):
    from cogtune.train import validation

    model, store = open_model(tiny_models["5b"]), t2v_validation_store
    generated = []
    real_generate = validation._generate
    monkeypatch.setattr(validation, "_generate", lambda *a: generated.append(a[2]) or real_generate(*a))
    paths = run_validation(model.load_transformer(), model, store, tmp_path / "run", 1, device="cpu",
                           dtype=torch.float32, seed=0, num_inference_steps=2, num_frames=9, height=32, width=32,
                           write=False)
    assert paths == [] and not (tmp_path / "run").exists()
    assert generated == [0, 1]  # both prompts generated: under FSDP or ZeRO-3 the forward passes are collectives


SETUPS = {
    "DDP": (DistributedType.MULTI_GPU, None),
    "ZeRO-2": (DistributedType.DEEPSPEED, 2),
    "FSDP": (DistributedType.FSDP, None),
    "ZeRO-3": (DistributedType.DEEPSPEED, 3),
}
"""accelerate's distributed type of each setup, and DeepSpeed's ZeRO stage."""


class FirstForward(Exception):
    """Raised by a rank that does not write at its first transformer forward: that it generates is what counts."""


@pytest.mark.parametrize(("setup", "rank", "generates"), [
    ("DDP", 1, False), ("ZeRO-2", 1, False),
    # each rank holds a shard of the weights: every forward pass gathers the layers from all ranks
    ("FSDP", 1, True), ("ZeRO-3", 1, True), ("FSDP", 0, True),
])
def test_validate_generates_on_every_rank_only_when_the_weights_are_sharded(t2v_validation_store, tiny_models,
                                                                             tmp_path, setup, rank, generates):
    """`trainer.validate` with the real validation and accelerate's distributed types, as one rank of a setup runs
    it: whether the rank runs the transformer (a rank other than 0 is stopped at its first forward pass, which
    `validate` tolerates as it does any validation error) and what it writes (rank 0 alone: the videos and the
    sheet; `test_validation_on_a_rank_that_does_not_write_generates_and_writes_nothing` runs one whole)."""
    from types import SimpleNamespace

    from cogtune.train import trainer

    distributed_type, zero_stage = SETUPS[setup]
    waited = []
    accelerator = SimpleNamespace(is_main_process=rank == 0, process_index=rank, device="cpu",
                                  distributed_type=distributed_type,
                                  state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage)),
                                  unwrap_model=lambda m: m, wait_for_everyone=lambda: waited.append(True))
    model = open_model(tiny_models["5b"])
    transformer = model.load_transformer()
    forwards = []

    def count(*args):
        forwards.append(1)
        if rank != 0:
            raise FirstForward

    transformer.register_forward_hook(count)
    out = tmp_path / "run"
    config = TrainConfig(store=t2v_validation_store, model=str(model.path), out=out, mixed_precision="no",
                         validation_inference_steps=1)
    trainer.validate(config, accelerator, transformer, model, 1, (9, 32, 32))
    assert bool(forwards) == generates
    written = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert written == (["step-000001-0.mp4", "step-000001-1.mp4", "step-000001.png"] if rank == 0 else [])
    assert waited == [True]  # every rank meets the others afterwards


def test_validation_renders_image_to_video_at_the_most_common_bucket(tiny_models, demo_dataset, tmp_path):
    """The default size is the trainer's: the bucket with the most samples, here not the first one."""
    model = open_model(tiny_models["1.5-5b-i2v"])
    store = encoded_store(demo_dataset, model.path, tmp_path / "store",
                          "--validation-images", demo_dataset / "validation_images.txt", "--image-noise-variants", "1")
    manifest = Manifest.load(store)
    [bucket] = manifest.buckets
    rarer = {**bucket, "name": "9x32x32", "width": 32, "samples": bucket["samples"] - 1}
    manifest.buckets = [rarer, bucket]
    manifest.save(store)
    paths = run_validation(model.load_transformer(), model, store, tmp_path / "run", 3, device="cpu",
                           dtype=torch.float32, seed=0, num_inference_steps=2, num_frames=None, height=None, width=None)
    assert_videos(paths, tmp_path / "run", 3, (bucket["frames"], bucket["height"], bucket["width"]))


def test_validation_without_prompts_writes_nothing(tiny_models, tmp_path):
    write_extras(tmp_path, {"empty_embedding": torch.zeros(226, 16)}, {"validation_prompts": "[]"})
    model = open_model(tiny_models["5b"])
    paths = run_validation(torch.nn.Module(), model, tmp_path, tmp_path / "run", 1, device="cpu",
                           dtype=torch.float32, seed=0, num_inference_steps=2, num_frames=None, height=None, width=None)
    assert paths == [] and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# model card

CONFIG = {"mode": "lora", "learning_rate": 1e-4, "lora": {"rank": RANK, "alpha": ALPHA}, "note": "a|b"}


def card_parts(path):
    _, front, body = path.read_text().split("---\n", 2)
    snippet = body.split("```python\n", 1)[1].split("```", 1)[0]
    return yaml.safe_load(front), body, snippet


def test_lora_model_card_has_front_matter_snippet_and_settings(tmp_path):
    path = write_model_card(tmp_path, CONFIG, "THUDM/CogVideoX-5b", "5b", "lora")
    front, body, snippet = card_parts(path)
    assert front["base_model"] == "THUDM/CogVideoX-5b" and front["library_name"] == "diffusers"
    assert {"cogvideox", "lora", "text-to-video"} <= set(front["tags"])
    compile(snippet, "snippet", "exec")
    assert "CogVideoXPipeline.from_pretrained('THUDM/CogVideoX-5b', torch_dtype=torch.bfloat16)" in snippet
    assert f"RUN_DIR = {str(tmp_path.resolve())!r}" in snippet
    assert 'pipe.load_lora_weights(RUN_DIR, adapter_name="cogtune")' in snippet
    assert "fps=8" in snippet
    rows = ["| learning_rate | 0.0001 |", f"| lora.rank | {RANK} |", f"| lora.alpha | {ALPHA} |", "| note | a\\|b |"]
    for row in rows:
        assert row in body


def test_full_model_card_loads_the_transformer_into_the_image_to_video_pipeline(tiny_models, tmp_path):
    path = write_model_card(tmp_path, {"mode": "full"}, str(tiny_models["1.5-5b-i2v"]), "1.5-5b-i2v", "full")
    front, _, snippet = card_parts(path)
    assert "base_model" not in front  # a local folder is no hub link
    assert front["pipeline_tag"] == "image-to-video"
    compile(snippet, "snippet", "exec")
    assert 'CogVideoXTransformer3DModel.from_pretrained(\n    RUN_DIR, subfolder="transformer"' in snippet
    assert "CogVideoXImageToVideoPipeline.from_pretrained(" in snippet and "transformer=transformer" in snippet
    assert "image=image" in snippet and "fps=16" in snippet


@pytest.mark.parametrize(("clip_fps", "words"), [
    (8.0, "Trained on clips sampled at 8 fps (the model's own rate); export generated videos at 8 fps"),
    (12.0, "Trained on clips sampled at 12 fps; export generated videos at 12 fps"),
    (None, "Trained on clips at each source video's own frame rate; the pipeline's videos play at 8 fps"),
])
def test_the_model_card_states_the_frame_rate_the_clips_were_sampled_at(tmp_path, clip_fps, words):
    card = write_model_card(tmp_path, {"mode": "lora"}, "THUDM/CogVideoX-5b", "5b", "lora", clip_fps=clip_fps)
    assert words in card.read_text()


def test_a_runs_model_card_shows_the_values_it_used_and_absolute_paths(train_store, tiny_models, tmp_path,
                                                                        monkeypatch):
    """Given relative paths and left at their defaults, --lora-alpha and --batch-size appear as what the run
    used (the rank; each bucket's batch size from the store), the model and folders as absolute paths, and the
    snippet renders at the size the run trained at (its most common bucket), not the model's native size."""
    import os
    from pathlib import Path

    from cogtune.train.validation import most_common_bucket
    from train_helpers import cogtrain

    monkeypatch.chdir(tmp_path)
    model = Path(os.path.relpath(tiny_models["5b"], tmp_path))
    cogtrain(Path(os.path.relpath(train_store, tmp_path)), model, Path("run"), "--max-steps", "1")
    front, body, snippet = card_parts(tmp_path / "run" / "README.md")
    table = body.split("## Training settings", 1)[1]
    assert "null" not in table
    absolute = str(tiny_models["5b"].resolve())
    for row in ("| lora_alpha | 4.0 |", "| max_steps | 1 |", f"| model | {absolute} |",
                f"| store | {train_store.resolve()} |", f"| out | {(tmp_path / 'run').resolve()} |"):
        assert row in table, row
    manifest = Manifest.load(train_store)
    for bucket in manifest.buckets:
        assert f"| batch_size.{bucket['name']} | {bucket['batch_size']} |" in table
    assert f"Fine-tuned from `{absolute}`" in body
    assert f"from_pretrained({absolute!r}" in snippet
    frames, height, width = most_common_bucket(manifest)
    assert f"num_frames={frames}, height={height}, width={width}," in snippet
    compile(snippet, "snippet", "exec")
