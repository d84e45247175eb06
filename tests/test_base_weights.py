"""--base-weights fp8: frozen weights stored in float8 during training, losses near a bf16 run's, a LoRA that loads
into the stock pipeline, DDP on two processes, and the refusals (sft, --compile, FSDP/DeepSpeed)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cogtune.shared.errors import CogtuneError
from cogtune.shared.models import open_model
from cogtune.train import validation
from cogtune.train.base_weights import STORAGE_DTYPE, check_fp8_parallelism
from cogtune.train.config import TrainConfig
from cogtune.train.math import TrainBatch, training_step
from cogtune.train.outputs import unwrap_model
from cogtune.train.trainer import build_transformer
from train_helpers import cogtrain, cogtrain_command, launch, losses

STEPS = 4
LOSS_RTOL = 0.01
"""fp8 losses against bf16's, relative. float8 e4m3 keeps 3 mantissa bits: each frozen weight is off by up to 1/16
of itself (about 1/28 rms), against bfloat16's 1/256. Those errors are independent across the weights of a layer,
so each layer's output moves by a few tenths of a percent, not by 1/28, and the loss, a mean over every latent
element, moves less again: a few hundredths of a percent on the tiny 5b (measured: under 0.05 %). 1 % leaves room
for other seeds and steps and still fails a cast that goes wrong (weights in float8 used unscaled as bf16 codes,
a LoRA trained in float8, layers left at zero), which move the loss by far more."""


@pytest.fixture(scope="module")
def runs(train_store, tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Run folders of the same 4 steps at --mixed-precision bf16 with bf16 and with fp8 base weights; the fp8 run
    validates at its last step, and ``runs["validated_on"]`` holds the dtypes of the adapted layers' frozen
    weights in the transformer handed to the validation pipeline."""
    folder = tmp_path_factory.mktemp("base-weights")
    validated_on = set()
    real = validation.run_validation

    def recording(transformer, *args, **kwargs):
        validated_on.update(p.dtype for n, p in unwrap_model(transformer).named_parameters() if "base_layer" in n)
        return real(transformer, *args, **kwargs)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(validation, "run_validation", recording)
        for base, extra in (("bf16", ()), ("fp8", ("--validate-every", STEPS, "--validation-inference-steps", 2))):
            cogtrain(train_store, tiny_models["5b"], folder / base, "--max-steps", STEPS, "--learning-rate", "1e-3",
                     "--mixed-precision", "bf16", "--base-weights", base, *extra)
    return {"bf16": folder / "bf16", "fp8": folder / "fp8", "validated_on": validated_on}


def test_fp8_losses_stay_within_a_percent_of_bf16(runs):
    bf16, fp8 = losses(runs["bf16"]), losses(runs["fp8"])
    assert sorted(bf16) == sorted(fp8) == list(range(1, STEPS + 1))
    for step in bf16:
        assert fp8[step] == pytest.approx(bf16[step], rel=LOSS_RTOL), step
    assert fp8 != bf16, "the same losses: the weights were not stored in float8"


def test_validation_ran_on_the_float8_weights(runs):
    assert runs["validated_on"] == {STORAGE_DTYPE}
    assert [p.name for p in (runs["fp8"] / "validation").glob("*.mp4")] == [f"step-{STEPS:06d}-0.mp4"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fp8_trained_lora_loads_into_the_stock_pipeline_and_changes_its_output(runs, tiny_models, dtype):
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(tiny_models["5b"], torch_dtype=dtype)
    base = _forward(pipe.transformer, dtype)
    pipe.load_lora_weights(runs["fp8"])
    assert {p.dtype for p in pipe.transformer.parameters()} == {dtype}
    loaded = _forward(pipe.transformer, dtype)
    assert torch.isfinite(loaded).all()
    # the forward is deterministic (without the adapter it gives `base` again, bit for bit); four steps at lr 1e-3
    # move the output by about 1e-3, far above float32's rounding and past bfloat16's
    assert (loaded - base).abs().max() > 5e-4


def _forward(transformer, dtype) -> torch.Tensor:
    c = transformer.config
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 3, c.in_channels, c.sample_height, c.sample_width, generator=g)
    text = torch.randn(1, c.max_text_seq_length, c.text_embed_dim, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=latents.to(dtype), encoder_hidden_states=text.to(dtype),
                           timestep=torch.tensor([500]), return_dict=False)[0].float()


def test_the_model_card_says_the_base_was_stored_in_float8(runs):
    assert "stored in float8 (e4m3)" in (runs["fp8"] / "README.md").read_text()
    assert "float8" not in (runs["bf16"] / "README.md").read_text()


@pytest.mark.parametrize("offload", [False, True])
def test_frozen_linear_weights_are_float8_in_memory_throughout_a_training_step(tiny_models, offload):
    model_path = tiny_models["5b"]
    model = open_model(model_path)
    config = TrainConfig(store=Path("store"), model=str(model_path), out=Path("run"), mixed_precision="bf16",
                         base_weights="fp8", offload_checkpoints=offload)
    transformer = build_transformer(config, model)
    frozen_linears = {name: m for name, m in transformer.named_modules()
                      if isinstance(m, torch.nn.Linear) and name.endswith((".base_layer", ".ff.net.2", ".proj"))
                      and "patch_embed" not in name}
    assert frozen_linears
    seen = []  # the frozen linears' weight dtypes as each block starts, in the forward pass and the recompute

    def record(block, args):
        seen.append({m.weight.dtype for m in frozen_linears.values()})

    for block in transformer.transformer_blocks:
        block.register_forward_pre_hook(record)
    tc = transformer.config
    g = torch.Generator().manual_seed(1)
    shape = (1, tc.in_channels, 3, 4, 6)
    batch = TrainBatch(latent_mean=torch.randn(shape, generator=g), latent_logvar=torch.randn(shape, generator=g),
                       prompt_embeds=torch.randn(1, tc.max_text_seq_length, tc.text_embed_dim, generator=g,
                                                 dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as accelerate wraps the forward
        loss = training_step(transformer, model.load_scheduler(), batch, vae_scaling_factor=0.7,
                             invert_scale_latents=False, generator=torch.Generator().manual_seed(3))
    loss.backward()

    assert len(seen) == 2 * tc.num_layers  # gradient checkpointing: every block twice
    assert all(dtypes == {STORAGE_DTYPE} for dtypes in seen)
    params = dict(transformer.named_parameters())
    trained = {name: p for name, p in params.items() if p.requires_grad}
    assert trained and all(".lora_" in name and p.dtype == torch.float32 for name, p in trained.items())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained.values())
    # what diffusers and finetrainers leave in the compute dtype
    for name in ("patch_embed.proj.weight", "time_embedding.linear_1.weight",
                 "transformer_blocks.0.norm1.linear.weight", "norm_out.linear.weight", "proj_out.weight"):
        assert params[name].dtype == torch.bfloat16, name
    # left out of DDP's broadcast: gloo has no float8 type
    in_fp8 = {name for name, p in params.items() if p.dtype == STORAGE_DTYPE}
    assert set(transformer._ddp_params_and_buffers_to_ignore) == in_fp8


@pytest.mark.slow
def test_two_processes_train_on_float8_base_weights_alike(train_store, tiny_models, tmp_path):
    run = tmp_path / "run"
    launch(cogtrain_command(train_store, tiny_models["5b"], run, "--max-steps", "2", "--mixed-precision", "bf16",
                            "--base-weights", "fp8", processes=2))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps_per_rank"] == [2, 2]
    first, second = summary["trained_weights_sha256_per_rank"]
    assert first == second  # DDP reduced the LoRA gradients: the ranks trained alike


@pytest.mark.parametrize(("options", "words"), [
    (("--mode", "sft"), "--base-weights fp8: LoRA only"),
    (("--compile",), "--compile: not with --base-weights fp8"),
])
def test_refused_combinations_are_one_line_exit_2_and_write_nothing(train_store, tiny_models, tmp_path, options, words):
    run = tmp_path / "run"
    result = cogtrain(train_store, tiny_models["5b"], run, "--base-weights", "fp8", *options, expect=2)
    assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr
    assert not run.exists()


@pytest.mark.parametrize(("kind", "name"), [("FSDP", "FSDP"), ("DEEPSPEED", "DeepSpeed")])
def test_fp8_is_refused_under_sharding_and_deepspeed(kind, name):
    from accelerate.utils import DistributedType

    accelerator = SimpleNamespace(distributed_type=getattr(DistributedType, kind))
    with pytest.raises(CogtuneError, match=f"--base-weights fp8: not supported under {name}"):
        check_fp8_parallelism(accelerator)
    check_fp8_parallelism(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))  # DDP: allowed
