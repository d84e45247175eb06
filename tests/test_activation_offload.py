"""--offload-checkpoints: the same loss and gradients as plain gradient checkpointing, with every block's
checkpointed input moved off the device (the memory it saves shows on a GPU only: here host is device)."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from cogtune.shared.errors import CogtuneError
from cogtune.shared.models import open_model
from cogtune.train import activation_offload
from cogtune.train.config import TrainConfig
from cogtune.train.math import TrainBatch, training_step
from cogtune.train.trainer import build_transformer


def _config(model: Path, **options) -> TrainConfig:
    return TrainConfig(store=Path("store"), model=str(model), out=Path("run"), lora_dropout=0.1, **options)


def _loss_and_grads(model_path: Path, mode: str, precision: str, offload: bool, device: str, monkeypatch):
    """One training step of a freshly built transformer: the loss, the trained weights' gradients, how many
    block inputs went to the host, and how many were still in device memory when the backward pass began."""
    offloaded = []
    real_copy = activation_offload.copy_to_host
    monkeypatch.setattr(activation_offload, "copy_to_host", lambda t: offloaded.append(t.shape) or real_copy(t))
    model = open_model(model_path)
    torch.manual_seed(0)  # the LoRA initialisation
    config = _config(model_path, mode=mode, mixed_precision=precision, offload_checkpoints=offload)
    transformer = build_transformer(config, model).to(device)
    tc = transformer.config
    g = torch.Generator().manual_seed(1)
    latents = (2, tc.in_channels, 3, 8, 12)
    batch = TrainBatch(latent_mean=torch.randn(latents, generator=g).to(device),
                       latent_logvar=torch.randn(latents, generator=g).to(device),
                       prompt_embeds=torch.randn(2, tc.max_text_seq_length, tc.text_embed_dim, generator=g).to(device))
    block_inputs = []  # the memory of each block's video-token input, as the forward pass gave it

    def remember_input(block, args):
        if len(block_inputs) < tc.num_layers:  # not again in the recompute
            block_inputs.append(weakref.ref(args[0].untyped_storage()))

    for block in transformer.transformer_blocks:
        block.register_forward_pre_hook(remember_input)
    torch.manual_seed(2)  # LoRA dropout draws from the global generator, in the forward and again in the recompute
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    batch.prompt_embeds = batch.prompt_embeds.to(dtype if mode == "lora" else torch.float32)  # as cogtrain feeds it
    with torch.autocast(device, dtype=dtype, enabled=precision == "bf16"):  # as accelerate wraps the forward
        loss = training_step(transformer, model.load_scheduler(), batch, vae_scaling_factor=0.7,
                             invert_scale_latents=False, generator=torch.Generator(device).manual_seed(3))
    kept = sum(ref() is not None for ref in block_inputs)  # between the forward and the backward pass
    loss.backward()
    grads = {name: p.grad.clone() for name, p in transformer.named_parameters() if p.requires_grad}
    return loss.item(), grads, len(offloaded), kept


# on CUDA the input really leaves the device (pinned host memory, an asynchronous copy each way)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("mode", "precision"), [("lora", "no"), ("lora", "bf16"), ("sft", "no")])
def test_offloaded_checkpoints_give_the_same_loss_and_gradients(tiny_models, mode, precision, device, monkeypatch):
    model = tiny_models["2b"]
    plain = _loss_and_grads(model, mode, precision, False, device, monkeypatch)
    plain_loss, plain_grads, plain_offloaded, plain_kept = plain
    loss, grads, offloaded, kept = _loss_and_grads(model, mode, precision, True, device, monkeypatch)
    layers = open_model(model).config("transformer")["num_layers"]
    assert plain_offloaded == 0 and offloaded == layers  # every block's input, once: the forward pass
    # plain checkpointing keeps every block's input for the backward pass; offloading frees them, except the
    # first block's, whose memory the text tokens share (both are slices of the patch embedding's output)
    assert plain_kept == layers and kept == 1
    assert loss == plain_loss
    assert grads.keys() == plain_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), name
    assert any(grad.abs().sum() > 0 for grad in grads.values())


def test_offload_needs_gradient_checkpointing(tiny_models):
    with pytest.raises(CogtuneError, match="--offload-checkpoints: needs --gradient-checkpointing"):
        _config(tiny_models["2b"], offload_checkpoints=True, gradient_checkpointing=False).validate()
