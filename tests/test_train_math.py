"""Oracle tests for cogtune.train.math: the diffusers pipelines, run on tiny models of every variant, decide.

Where possible a test runs the pipeline's own code (``__call__`` with one step, ``prepare_latents``,
``_prepare_rotary_positional_embeddings``, the VAE posterior, the scheduler) and compares what it feeds the
transformer with what `training_step` feeds it, instead of restating the pipeline's formulas.
"""

from __future__ import annotations

import copy
import functools
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cogtune.preprocess.frames import resize_to_bucket
from cogtune.shared import store as S
from cogtune.shared.variants import VARIANTS, get_variant
from cogtune.shared.video import write_video
from cogtune.shared.zoo import TINY_NATIVE, build_tiny_pipeline
from cogtune.train.math import (
    TrainBatch,
    drop_captions,
    image_conditioning,
    ofs_tensor,
    pad_latent_frames,
    padded_frame_count,
    rotary_embeddings,
    sample_latents,
    training_step,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from prep_helpers import encode, store_content

ALL = list(VARIANTS)
I2V = [s for s in ALL if VARIANTS[s].task == "i2v"]
GEN_15 = [s for s in ALL if VARIANTS[s].generation == "1.5"]
LATENT_CHANNELS = 16


@functools.cache
def tiny_pipeline(slug: str):
    """One in-memory tiny pipeline per variant for the whole module (tests restore whatever they patch).

    `build_tiny_pipeline` gives its modules in eval mode, as ``from_pretrained`` (cogprep, a user's pipeline) does:
    the T5 has dropout (0.1), and in training mode its embeddings would be random.
    """
    return build_tiny_pipeline(slug, seed=0)


def native_size(slug: str) -> tuple[int, int, int]:
    """(frames, height, width) in pixels; 5b-I2V's learned positional table only works at this size."""
    return TINY_NATIVE[VARIANTS[slug].generation]


FRAME_COUNTS = (9, 17, 33)
"""Pixel frames of the oracle comparisons: the tiny models' native 9 and two others (3, 5 and 9 latent frames;
1.5 pads them to 4, 6 and 10)."""


def with_frames(slugs: list[str]) -> list[tuple[str, int]]:
    """(slug, pixel frames) for every count of `FRAME_COUNTS`, but only the native one for 5b-I2V, whose learned
    positional table exists only at its native size."""
    return [(s, f) for s in slugs for f in FRAME_COUNTS if f == native_size(s)[0] or not VARIANTS[s].fixed_size]


def transformer_frames(slug: str, pixel_frames: int) -> int:
    """Latent frames the transformer sees, stated independently of cogtune: 8N+1 pixel frames give 2N+1 latent
    frames (always odd), and 1.5 (patch_size_t 2) adds one."""
    assert (pixel_frames - 1) % 8 == 0
    return (pixel_frames - 1) // 4 + 1 + (1 if VARIANTS[slug].patch_size_t == 2 else 0)


def latent_frames(pixel_frames: int) -> int:
    return (pixel_frames - 1) // 4 + 1


def prompt_embeds(pipe, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
    cfg = pipe.transformer.config
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)


@contextmanager
def transformer_calls(transformer):
    """Record the keyword arguments of every transformer forward (the pipelines pass everything by keyword)."""
    calls: list[dict] = []
    handle = transformer.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def run_pipeline_one_step(pipe, slug, monkeypatch, image_latent=None, output_type="latent", pixel_frames=None,
                          **kwargs):
    """Run the pipeline's ``__call__`` for one step at native height and width and `pixel_frames` frames (default:
    native, 9); returns the transformer's kwargs.

    For I2V, the VAE encoder is replaced by one that returns `image_latent`, so ``prepare_latents`` (the
    pipeline's code, untouched) scales and places a latent the test knows
    (`test_cached_image_latent_is_what_prepare_latents_encodes` runs the real encoder).
    """
    frames, height, width = native_size(slug)
    frames = pixel_frames or frames
    args = dict(
        prompt_embeds=prompt_embeds(pipe),
        guidance_scale=1.0,  # no classifier-free guidance: batch 1, no negative prompt
        num_inference_steps=1,
        num_frames=frames,
        height=height,
        width=width,
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
    )
    if VARIANTS[slug].task == "i2v":
        encoded_inputs = []

        def encode(x):
            encoded_inputs.append(x.shape)
            return SimpleNamespace(latents=image_latent)  # what retrieve_latents takes when there is no latent_dist

        monkeypatch.setattr(pipe.vae, "encode", encode)
        args["image"] = Image.new("RGB", (width, height))
    with transformer_calls(pipe.transformer) as calls, torch.no_grad():
        pipe(**args, **kwargs)
    if VARIANTS[slug].task == "i2v":
        # the cached image latent is the first frame encoded as a 1-frame video, [1, 3, 1, H, W] in
        assert encoded_inputs == [torch.Size([1, 3, 1, height, width])]
    assert len(calls) == 1
    return calls[0]


def make_batch(slug, batch_size=2, pixel_frames=9, height=None, width=None, seed=0, image_latents=None):
    """A TrainBatch of random cached tensors shaped as cogprep stores them (stacked on the batch dim)."""
    pipe = tiny_pipeline(slug)
    _, native_h, native_w = native_size(slug)
    h, w = (height or native_h) // 8, (width or native_w) // 8
    g = torch.Generator().manual_seed(seed)
    shape = (batch_size, LATENT_CHANNELS, latent_frames(pixel_frames), h, w)
    if VARIANTS[slug].task == "i2v" and image_latents is None:
        image_latents = torch.randn(batch_size, LATENT_CHANNELS, 1, h, w, generator=g)
    return TrainBatch(
        latent_mean=torch.randn(shape, generator=g),
        latent_logvar=torch.randn(shape, generator=g) - 4.0,
        prompt_embeds=prompt_embeds(pipe, batch_size, seed),
        image_latents=image_latents,
    )


def step(slug, batch, seed=0, **kwargs):
    pipe = tiny_pipeline(slug)
    return training_step(
        pipe.transformer,
        pipe.scheduler,
        batch,
        vae_scaling_factor=pipe.vae.config.scaling_factor,
        invert_scale_latents=pipe.vae.config.invert_scale_latents,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


def assert_same_rotary(ours, theirs):
    if theirs is None:
        assert ours is None
    else:
        torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
        torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=0)


# ---- rotary embeddings ----


@pytest.mark.parametrize("slug", ALL)
def test_rotary_matches_pipeline_for_every_bucket_shape(slug):
    pipe = tiny_pipeline(slug)
    config = pipe.transformer.config
    for height, width in [(32, 48), (48, 32), (64, 96), (32, 32)]:
        for pixel_frames in (*FRAME_COUNTS, 1):
            frames = transformer_frames(slug, pixel_frames)  # 1.5: the padded count, as __call__ passes it
            assert frames == padded_frame_count(latent_frames(pixel_frames), config.patch_size_t)
            ours = rotary_embeddings(config, height // 8, width // 8, frames, "cpu")
            if not config.use_rotary_positional_embeddings:
                assert ours is None
                continue
            theirs = pipe._prepare_rotary_positional_embeddings(height, width, frames, "cpu")
            assert_same_rotary(ours, theirs)


# ---- what the pipeline feeds the transformer vs what training_step feeds it ----


@pytest.mark.parametrize(("slug", "frames"), with_frames(ALL))
def test_training_step_feeds_the_transformer_what_the_pipeline_does(slug, frames, monkeypatch):
    pipe = tiny_pipeline(slug)
    v = get_variant(slug)
    _, height, width = native_size(slug)
    image_latent = torch.randn(1, LATENT_CHANNELS, 1, height // 8, width // 8) if v.task == "i2v" else None
    theirs = run_pipeline_one_step(pipe, slug, monkeypatch, image_latent=image_latent, pixel_frames=frames)

    batch = make_batch(slug, batch_size=1, pixel_frames=frames, image_latents=image_latent)
    with transformer_calls(pipe.transformer) as calls:
        step(slug, batch)
    ours = calls[0]

    # same latent frame count (1.5: 3, 5, 9 -> 4, 6, 10) and channels (I2V: 16 noisy + 16 image)
    assert ours["hidden_states"].shape == theirs["hidden_states"].shape
    assert ours["hidden_states"].shape[1] == transformer_frames(slug, frames)
    assert ours["timestep"].dtype == theirs["timestep"].dtype
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"])
    assert_same_rotary(ours["image_rotary_emb"], theirs["image_rotary_emb"])
    if v.uses_ofs:
        assert theirs["ofs"] is not None
        torch.testing.assert_close(ours["ofs"], theirs["ofs"].expand(ours["ofs"].shape))
    else:  # the T2V pipeline passes no ofs at all: the transformer's default None
        assert theirs.get("ofs") is None and ours["ofs"] is None
    if v.task == "i2v":
        # the image channels are the condition itself (no noise is added to them): compare exactly
        torch.testing.assert_close(
            ours["hidden_states"][:, :, LATENT_CHANNELS:], theirs["hidden_states"][:, :, LATENT_CHANNELS:]
        )


@pytest.mark.parametrize(("slug", "frames"), with_frames(I2V))
def test_image_conditioning_matches_prepare_latents(slug, frames, monkeypatch):
    pipe = tiny_pipeline(slug)
    _, height, width = native_size(slug)
    image_latent = torch.randn(1, LATENT_CHANNELS, 1, height // 8, width // 8)
    theirs = run_pipeline_one_step(pipe, slug, monkeypatch, image_latent=image_latent, pixel_frames=frames)
    condition = theirs["hidden_states"][:, :, LATENT_CHANNELS:]
    assert condition.shape[1] == transformer_frames(slug, frames)

    ours = image_conditioning(
        image_latent, condition.shape[1], pipe.vae.config.scaling_factor, pipe.vae.config.invert_scale_latents
    )
    torch.testing.assert_close(ours, condition)
    # image at frame 0, zeros elsewhere, even for 1.5's padded 4, 6, 10 frames (no second copy of the image)
    assert ours[:, 0].abs().sum() > 0 and ours[:, 1:].abs().sum() == 0


@pytest.mark.parametrize("frames", FRAME_COUNTS)
@pytest.mark.parametrize("slug", GEN_15)
def test_15_padding_is_at_the_front_like_the_pipeline(slug, frames, monkeypatch):
    """The pipeline decodes ``latents[:, additional_frames:]``: the padding it drops is at the front."""
    pipe = tiny_pipeline(slug)
    _, height, width = native_size(slug)
    final, decoded = [], []

    def keep_final(pipeline, i, t, kwargs):
        final.append(kwargs["latents"])
        return {}

    def decode(latents):  # record what is decoded; a blank video stands in for the VAE's output
        decoded.append(latents)
        return torch.zeros(1, 3, frames, height, width)

    monkeypatch.setattr(pipe, "decode_latents", decode)
    image_latent = torch.randn(1, LATENT_CHANNELS, 1, height // 8, width // 8)
    run_pipeline_one_step(pipe, slug, monkeypatch, image_latent=image_latent, output_type="pt",
                          pixel_frames=frames, callback_on_step_end=keep_final)

    clip_frames = latent_frames(frames)
    padding = padded_frame_count(clip_frames, 2) - clip_frames
    expected = {9: (4, 3), 17: (6, 5), 33: (10, 9)}[frames]  # one frame of padding for every 8N+1 clip
    assert (final[0].shape[1], decoded[0].shape[1]) == (clip_frames + padding, clip_frames) == expected
    torch.testing.assert_close(decoded[0], final[0][:, padding:])

    clip = torch.randn(2, clip_frames, LATENT_CHANNELS, height // 8, width // 8)
    padded = pad_latent_frames(clip, 2)
    torch.testing.assert_close(padded[:, padding:], clip)  # what the pipeline keeps is the clip
    torch.testing.assert_close(padded[:, 0], clip[:, 0])


def test_padding_rule():
    x = torch.randn(1, 3, 2, 2, 2)
    assert pad_latent_frames(x, None) is x
    assert pad_latent_frames(x[:, :2], 2).shape[1] == 2
    image = pad_latent_frames(x[:, :1], 2)  # an image: 1 latent frame -> 2
    torch.testing.assert_close(image, x[:, :1].repeat(1, 2, 1, 1, 1))
    assert [padded_frame_count(f, 2) for f in (1, 2, 3, 13, 21)] == [2, 2, 4, 14, 22]
    assert [padded_frame_count(f, None) for f in (1, 3, 13)] == [1, 3, 13]


@pytest.mark.parametrize("slug", ALL)
def test_ofs_only_where_configured(slug):
    config = tiny_pipeline(slug).transformer.config
    ofs = ofs_tensor(config, 3, "cpu", torch.float32)
    if VARIANTS[slug].uses_ofs:
        torch.testing.assert_close(ofs, torch.full((3,), 2.0))
    else:
        assert ofs is None


# ---- latents, noise, target ----


def test_sample_latents_is_the_vae_posterior_sample_scaled():
    pipe = tiny_pipeline("1.5-5b")
    video = torch.rand(2, 3, 9, 48, 80) * 2 - 1
    with torch.no_grad():
        dist = pipe.vae.encode(video).latent_dist
    assert dist.mean.shape == (2, LATENT_CHANNELS, 3, 6, 10)  # cached per sample as [C, F, H, W]
    scale = pipe.vae.config.scaling_factor
    ours = sample_latents(dist.mean, dist.logvar, scale, torch.Generator().manual_seed(1))
    theirs = DiagonalGaussianDistribution(torch.cat([dist.mean, dist.logvar], dim=1)).sample(
        torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(ours, theirs.permute(0, 2, 1, 3, 4) * scale)
    other = sample_latents(dist.mean, dist.logvar, scale, torch.Generator().manual_seed(2))
    assert not torch.equal(ours, other)  # a fresh sample per draw


@pytest.mark.parametrize("slug", ALL)
def test_latent_scale_is_what_decode_latents_undoes(slug, monkeypatch):
    """training_step's x0 is the posterior sample times the VAE scaling factor; each pipeline's ``decode_latents``
    divides by its ``vae_scaling_factor_image`` before ``vae.decode``. So the x0 of a step, with 1.5's front
    padding dropped as ``__call__`` drops it, must reach the decoder as the plain posterior sample, for every
    variant: 2b's 1.15258426 included, and 1.5's ``invert_scale_latents`` (which only the I2V image latent reads)
    changing nothing in the decode."""
    pipe = tiny_pipeline(slug)
    v = VARIANTS[slug]
    assert pipe.vae_scaling_factor_image == pipe.vae.config.scaling_factor == v.vae_scaling_factor != 1.0
    steps_x0 = []
    add_noise = pipe.scheduler.add_noise
    monkeypatch.setattr(pipe.scheduler, "add_noise", lambda x0, eps, t: steps_x0.append(x0) or add_noise(x0, eps, t))
    batch = make_batch(slug, batch_size=2)
    with torch.no_grad():
        step(slug, batch, seed=5)

    [x0] = steps_x0
    clip_frames = batch.latent_mean.shape[2]
    additional_frames = x0.shape[1] - clip_frames
    assert additional_frames == (1 if v.patch_size_t else 0)
    decoder_inputs = []
    decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda z, *a, **k: decoder_inputs.append(z) or decode(z, *a, **k))
    with torch.no_grad():
        video = pipe.decode_latents(x0[:, additional_frames:])

    # the posterior sample: the step's generator draws it first (same clamp and draw as the VAE's latent_dist)
    posterior = DiagonalGaussianDistribution(torch.cat([batch.latent_mean, batch.latent_logvar], dim=1))
    sample = posterior.sample(torch.Generator().manual_seed(5))
    [decoded] = decoder_inputs
    torch.testing.assert_close(decoded, sample)
    assert video.shape == (2, 3, native_size(slug)[0], *native_size(slug)[1:])


@pytest.mark.parametrize("slug", ALL)
def test_noisy_latents_and_target_come_from_the_scheduler(slug, monkeypatch):
    """Every variant, 2b included: its CogVideoXDDIMScheduler has a config of its own (snr_shift_scale 3.0, where
    the 5B models have 1.0), which shifts alphas_cumprod and so the noisy latents and the v target."""
    pipe = tiny_pipeline(slug)
    scheduler = pipe.scheduler
    v = VARIANTS[slug]
    assert type(scheduler).__name__ == v.scheduler_class == "CogVideoXDDIMScheduler"
    assert scheduler.config.snr_shift_scale == v.snr_shift_scale == (3.0 if slug == "2b" else 1.0)
    recorded = {}

    def spy(name):
        original = getattr(scheduler, name)

        def wrapper(x0, noise, timesteps):
            recorded[name] = (x0, noise, timesteps, original(x0, noise, timesteps))
            return recorded[name][-1]

        monkeypatch.setattr(scheduler, name, wrapper)

    spy("add_noise")
    spy("get_velocity")
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda m, args, out: outputs.append(out[0]))
    batch = make_batch(slug, batch_size=2)
    try:
        with transformer_calls(pipe.transformer) as calls:
            loss = step(slug, batch, seed=5)
    finally:
        handle.remove()

    x0, noise, t, noisy = recorded["add_noise"]
    *same_inputs, velocity = recorded["get_velocity"]
    for a, b in zip((x0, noise, t), same_inputs):
        assert a is b
    assert t.dtype == torch.int64 and ((0 <= t) & (t < scheduler.config.num_train_timesteps)).all()
    torch.testing.assert_close(calls[0]["timestep"], t)
    torch.testing.assert_close(calls[0]["hidden_states"][:, :, :LATENT_CHANNELS], noisy)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(outputs[0].float(), velocity))

    # x0 is the scaled posterior sample (the generator's first draw), padded at the front for 1.5
    expected = sample_latents(
        batch.latent_mean, batch.latent_logvar, pipe.vae.config.scaling_factor, torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(x0, pad_latent_frames(expected, pipe.transformer.config.patch_size_t))
    # v-prediction as the scheduler's step reads it back: x0 = sqrt(a) * x_t - sqrt(1 - a) * v
    a = scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * noisy - (1 - a).sqrt() * velocity, x0, rtol=1e-4, atol=1e-4)


# ---- the whole step ----


@pytest.mark.parametrize("slug", ALL)
@pytest.mark.parametrize("pixel_frames", [9, 1])
def test_training_step_runs_and_backprops(slug, pixel_frames):
    pipe = tiny_pipeline(slug)
    v = VARIANTS[slug]
    # 5b-I2V's learned positions only allow the native size; elsewhere use a non-native bucket
    height, width = native_size(slug)[1:] if v.fixed_size else (64, 32)
    batch = make_batch(slug, batch_size=2, pixel_frames=pixel_frames, height=height, width=width)
    pipe.transformer.zero_grad()
    with transformer_calls(pipe.transformer) as calls:
        loss = step(slug, batch)
    loss.backward()

    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    channels = 2 * LATENT_CHANNELS if v.task == "i2v" else LATENT_CHANNELS
    frames = padded_frame_count(latent_frames(pixel_frames), v.patch_size_t)
    assert calls[0]["hidden_states"].shape == (2, frames, channels, height // 8, width // 8)
    grads = [p.grad for p in pipe.transformer.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    pipe.transformer.zero_grad(set_to_none=True)


def test_training_step_is_deterministic_for_a_seed():
    batch = make_batch("1.5-5b-i2v")
    with torch.no_grad():
        assert step("1.5-5b-i2v", batch, seed=3) == step("1.5-5b-i2v", batch, seed=3)
        assert step("1.5-5b-i2v", batch, seed=3) != step("1.5-5b-i2v", batch, seed=4)


BF16_EPS = 2.0**-8
"""bfloat16 keeps 8 significant bits: the gap between neighbouring values is 2^-8 of their size (round to
nearest: an error of at most half that per rounding)."""
BF16_TOLERANCE = 4 * BF16_EPS
"""Relative error allowed between the bfloat16 and float32 steps' predictions and gradients (norm of the difference
over norm of the float32 value). Weights, inputs and every op's output are rounded to bfloat16, and the roundings
compound through the layers and the backward pass: measured 1.4 to 1.9 eps (0.0055 to 0.0073) on the tiny models,
all variants. 4 eps leaves twice that; a real difference of path (another t, noise, scaling, padding or
conditioning) moves the prediction by O(1)."""


def bf16_copy(transformer):
    """The transformer as cogtrain's bf16 LoRA run loads it: ``load_transformer(torch.bfloat16)``."""
    return copy.deepcopy(transformer).to(torch.bfloat16)


@pytest.mark.parametrize("slug", ALL)
def test_bfloat16_step_matches_the_float32_step_within_bfloat16_precision(slug):
    """The bf16 path of training_step (what ``--mixed-precision bf16`` runs: weights and prompt embeddings in
    bfloat16, under autocast) against the float32 path on the same batch and generator seed. The draws (posterior
    sample, t, noise) and the target are made in float32 in both, so the transformer's input is the float32 one
    rounded once to bfloat16, exactly; the prediction, loss and gradients agree within `BF16_TOLERANCE`."""
    pipe = tiny_pipeline(slug)
    batch = make_batch(slug, batch_size=2)
    bf16_batch = TrainBatch(batch.latent_mean, batch.latent_logvar, batch.prompt_embeds.bfloat16(), batch.image_latents)

    def run(transformer, train_batch):
        predictions = []
        handle = transformer.register_forward_hook(lambda m, args, out: predictions.append(out[0].detach()))
        half = train_batch.prompt_embeds.dtype == torch.bfloat16
        try:
            with transformer_calls(transformer) as calls, torch.autocast("cpu", torch.bfloat16, enabled=half):
                loss = training_step(
                    transformer, pipe.scheduler, train_batch, vae_scaling_factor=pipe.vae.config.scaling_factor,
                    invert_scale_latents=pipe.vae.config.invert_scale_latents,
                    generator=torch.Generator().manual_seed(7),
                )
            loss.backward()
        finally:
            handle.remove()
        grads = {name: p.grad.float() for name, p in transformer.named_parameters() if p.grad is not None}
        transformer.zero_grad(set_to_none=True)
        return loss.detach(), predictions[0], calls[0], grads

    loss32, pred32, in32, grads32 = run(pipe.transformer, batch)
    loss16, pred16, in16, grads16 = run(bf16_copy(pipe.transformer), bf16_batch)

    # the same inputs: the float32 step's, rounded to bfloat16 once
    assert in16["hidden_states"].dtype == torch.bfloat16 and pred16.dtype == torch.bfloat16  # really bf16
    assert torch.equal(in16["hidden_states"], in32["hidden_states"].bfloat16())
    assert torch.equal(in16["encoder_hidden_states"], in32["encoder_hidden_states"].bfloat16())
    assert torch.equal(in16["timestep"], in32["timestep"])
    assert_same_rotary(in16["image_rotary_emb"], in32["image_rotary_emb"])  # float32 tables in both
    if VARIANTS[slug].uses_ofs:
        assert torch.equal(in16["ofs"].float(), in32["ofs"])

    def relative_error(ours, reference):
        return ((ours.float() - reference).norm() / reference.norm()).item()

    error = relative_error(pred16, pred32)
    assert 0 < error < BF16_TOLERANCE  # > 0: the bfloat16 path did compute in bfloat16
    assert grads16.keys() == grads32.keys() and grads32
    flat16, flat32 = (torch.cat([g[n].flatten() for n in sorted(grads32)]) for g in (grads16, grads32))
    assert relative_error(flat16, flat32) < BF16_TOLERANCE
    # loss = mean((p - v)^2): with |p16 - p32| <= tol * |p32| (rms), Cauchy-Schwarz bounds its change by
    # 2 sqrt(loss) tol rms(p32) + (tol rms(p32))^2; v, the target, is the same float32 tensor in both
    assert loss16.dtype == loss32.dtype == torch.float32
    drift = BF16_TOLERANCE * pred32.pow(2).mean().sqrt()
    assert abs(loss16 - loss32) <= 2 * loss32.sqrt() * drift + drift**2


def test_training_step_refuses_a_batch_of_the_wrong_task():
    i2v_batch = make_batch("5b-i2v")
    with pytest.raises(ValueError, match="takes no image_latents"):
        step("5b", i2v_batch)
    i2v_batch.image_latents = None
    with pytest.raises(ValueError, match="needs image_latents"):
        step("5b-i2v", i2v_batch)


# ---- caption dropout ----


def test_drop_captions():
    prompts = torch.randn(64, 226, 16)
    empty = torch.randn(226, 16)
    assert torch.equal(drop_captions(prompts, empty, 0.0, torch.Generator().manual_seed(0)), prompts)
    assert torch.equal(drop_captions(prompts, empty, 1.0, torch.Generator().manual_seed(0)), empty.expand_as(prompts))
    out = drop_captions(prompts, empty, 0.5, torch.Generator().manual_seed(0))
    dropped = (out == empty).all(dim=(1, 2))
    kept = (out == prompts).all(dim=(1, 2))
    assert (dropped ^ kept).all() and 0 < dropped.sum() < 64
    assert torch.equal(out, drop_captions(prompts, empty, 0.5, torch.Generator().manual_seed(0)))


# ---- what cogprep caches vs what the pipelines compute ----


def one_clip_dataset(folder: Path, slug: str) -> np.ndarray | None:
    """A txt dataset of one random clip at the variant's native size and frame rate; for I2V with an
    ``images.txt`` image (a PNG at the native size: lossless, and no resizing on either side). Returns the image."""
    v = VARIANTS[slug]
    frames, height, width = native_size(slug)
    rng = np.random.default_rng(0)
    (folder / "videos").mkdir(parents=True)
    write_video(folder / "videos" / "clip.mp4", (rng.random((2 * frames, height, width, 3)) * 255).astype(np.uint8),
                fps=v.fps)
    (folder / "prompts.txt").write_text("a red circle moving left to right\n")
    (folder / "videos.txt").write_text("videos/clip.mp4\n")
    if v.task != "i2v":
        return None
    image = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    (folder / "images").mkdir()
    Image.fromarray(image).save(folder / "images" / "first.png")
    (folder / "images.txt").write_text("images/first.png\n")
    return image


@pytest.fixture(scope="module")
def float32_stores(tiny_models, tmp_path_factory):
    """``float32_stores[slug]``: (store, I2V image or None), `cogprep encode` of `one_clip_dataset` with the tiny model
    of `slug` (the folder `make_tiny_model` wrote: the weights `tiny_pipeline` builds), stored in float32 so that
    values compare with the pipeline's (bfloat16 storage would only round them). Built on first use."""

    class _Lazy(dict):
        def __missing__(self, slug):
            folder = tmp_path_factory.mktemp(f"f32-{slug}")
            image = one_clip_dataset(folder / "data", slug)
            frames, height, width = native_size(slug)
            encode(folder / "data", tiny_models[slug], folder / "store", "--resolution", f"{frames}x{height}x{width}",
                   "--dtype", "float32")
            self[slug] = (folder / "store", image)
            return self[slug]

    return _Lazy()


@pytest.mark.parametrize("slug", ALL)
def test_cached_empty_embedding_is_the_pipelines_negative_prompt_embedding(slug, float32_stores):
    """cogprep's ``empty_embedding`` (caption dropout's stand-in, validation's negative prompt) against the
    pipeline's ``encode_prompt`` for the default negative prompt (None -> ""), run as ``__call__`` runs it (under
    no_grad) with T5 in eval mode: the same values (equal here; 1e-5 allows another kernel's rounding order,
    while a T5 in training mode, an attention mask or another padding length moves them by O(1))."""
    store, _ = float32_stores[slug]
    pipe = tiny_pipeline(slug)
    assert not pipe.text_encoder.training
    cached = S.read_extras(store)[0]["empty_embedding"]
    with torch.no_grad():
        positive, negative = pipe.encode_prompt(
            "a red circle moving left to right", negative_prompt=None, do_classifier_free_guidance=True,
            max_sequence_length=pipe.transformer.config.max_text_seq_length, device=torch.device("cpu"),
        )
    assert cached.dtype == torch.float32 and cached.shape == negative.shape[1:] == (226, 16)
    torch.testing.assert_close(cached, negative[0], rtol=0, atol=1e-5)
    # and the caption's cached embedding is the positive one: the two differ, so the comparison above can fail
    [item] = store_content(store).values()
    torch.testing.assert_close(item[S.EMBEDDING], positive[0], rtol=0, atol=1e-5)
    assert (cached - item[S.EMBEDDING]).abs().max() > 0.1


@pytest.mark.parametrize("slug", I2V)
def test_cached_image_latent_is_what_prepare_latents_encodes(slug, float32_stores):
    """The I2V conditioning image through the real tiny VAE (no encoder stand-in): cogprep's clean latent against
    the image channels that ``__call__`` (``preprocess``, then ``prepare_latents``) feeds the transformer.

    ``prepare_latents`` takes ``retrieve_latents(vae.encode(image), generator)``: a posterior *sample*
    (mean + std * eps, eps the generator's first draw), scaled by ``scaling_factor`` (1.0) or its inverse (1.5,
    ``invert_scale_latents``), at frame 0 of zeros. It adds no pixel noise: the noise-augmented encodings that
    cogtrain draws from are a training-time augmentation (the release's), not the pipeline's. So the pipeline's
    condition is `image_conditioning` of the cached clean mean plus the posterior's std * eps, with std from the
    pipeline's own VAE: that checks pixel normalisation, the 1-frame layout, the encoder, scaling and placement."""
    store, image = float32_stores[slug]
    pipe = tiny_pipeline(slug)
    frames, height, width = native_size(slug)
    assert np.array_equal(resize_to_bucket(image[None], height, width, "crop")[0], image)  # cogprep kept the pixels
    [item] = store_content(store).values()
    clean = item[S.CLEAN][None]  # [1, C, 1, H, W]
    assert clean.dtype == torch.float32 and clean.shape == (1, LATENT_CHANNELS, 1, height // 8, width // 8)

    encoded = []
    handle = pipe.vae.encoder.register_forward_hook(lambda m, args, out: encoded.append(args[0].shape))
    try:
        with transformer_calls(pipe.transformer) as calls, torch.no_grad():
            pipe(image=Image.fromarray(image), prompt_embeds=prompt_embeds(pipe), guidance_scale=1.0,
                 num_inference_steps=1, num_frames=frames, height=height, width=width,
                 generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        handle.remove()
    assert encoded == [torch.Size([1, 3, 1, height, width])]  # the real encoder ran, on the image as one frame
    condition = calls[0]["hidden_states"][:, :, LATENT_CHANNELS:]

    pixels = torch.from_numpy(image).permute(2, 0, 1).float()[None, :, None] / 127.5 - 1.0
    with torch.no_grad():
        posterior = pipe.vae.encode(pixels).latent_dist
    torch.testing.assert_close(clean, posterior.mean, rtol=0, atol=2e-5)  # cogprep encodes what the pipeline does
    eps = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    scaling, invert = pipe.vae.config.scaling_factor, pipe.vae.config.invert_scale_latents
    ours = image_conditioning(clean + posterior.std * eps, condition.shape[1], scaling, invert)
    torch.testing.assert_close(ours, condition, rtol=0, atol=5e-5)
    # the other scaling would not pass (1.5: 1/0.7 vs 0.7)
    wrong = image_conditioning(clean + posterior.std * eps, condition.shape[1], scaling, not invert)
    assert (wrong - condition).abs().max() > 0.1


def test_the_crop_region_for_the_rotary_grid_is_the_pipelines():
    """cogtune's copy (kept out of the pipeline module's imports) against diffusers' own, on grids wider,
    taller and the same shape as the base grid."""
    from cogtune.train.math import resize_crop_region_for_grid
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    for grid in [(30, 45), (45, 30), (30, 30), (17, 53), (60, 90), (1, 7), (7, 1)]:
        for base_width, base_height in [(45, 30), (30, 30), (90, 60)]:
            assert resize_crop_region_for_grid(grid, base_width, base_height) == \
                get_resize_crop_region_for_grid(grid, base_width, base_height), (grid, base_width, base_height)
