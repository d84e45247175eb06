"""Oracle tests for cogtune.train.math: the diffusers pipelines, run on tiny models of every variant, decide.

Where possible a test runs the pipeline's own code (``__call__`` with one step, ``prepare_latents``,
``_prepare_rotary_positional_embeddings``, the VAE posterior, the scheduler) and compares what it feeds the
transformer with what `training_step` feeds it, instead of restating the pipeline's formulas.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from cogtune.shared.variants import VARIANTS, get_variant
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

ALL = list(VARIANTS)
I2V = [s for s in ALL if VARIANTS[s].task == "i2v"]
GEN_15 = [s for s in ALL if VARIANTS[s].generation == "1.5"]
LATENT_CHANNELS = 16


@functools.cache
def tiny_pipeline(slug: str):
    """One in-memory tiny pipeline per variant for the whole module (tests restore whatever they patch)."""
    return build_tiny_pipeline(slug, seed=0)


def native_size(slug: str) -> tuple[int, int, int]:
    """(frames, height, width) in pixels; 5b-I2V's learned positional table only works at this size."""
    return TINY_NATIVE[VARIANTS[slug].generation]


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


def run_pipeline_one_step(pipe, slug, monkeypatch, image_latent=None, output_type="latent", **kwargs):
    """Run the pipeline's ``__call__`` for one step at native size, 9 frames; returns the transformer's kwargs.

    For I2V, the VAE encoder is replaced by one that returns `image_latent`, so ``prepare_latents`` (the
    pipeline's code, untouched) scales and places a latent the test knows.
    """
    frames, height, width = native_size(slug)
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
        for pixel_frames in (9, 17, 1):
            frames = padded_frame_count(latent_frames(pixel_frames), config.patch_size_t)
            ours = rotary_embeddings(config, height // 8, width // 8, frames, "cpu")
            if not config.use_rotary_positional_embeddings:
                assert ours is None
                continue
            theirs = pipe._prepare_rotary_positional_embeddings(height, width, frames, "cpu")
            assert_same_rotary(ours, theirs)


# ---- what the pipeline feeds the transformer vs what training_step feeds it ----


@pytest.mark.parametrize("slug", ALL)
def test_training_step_feeds_the_transformer_what_the_pipeline_does(slug, monkeypatch):
    pipe = tiny_pipeline(slug)
    v = get_variant(slug)
    frames, height, width = native_size(slug)
    image_latent = torch.randn(1, LATENT_CHANNELS, 1, height // 8, width // 8) if v.task == "i2v" else None
    theirs = run_pipeline_one_step(pipe, slug, monkeypatch, image_latent=image_latent)

    batch = make_batch(slug, batch_size=1, pixel_frames=frames, image_latents=image_latent)
    with transformer_calls(pipe.transformer) as calls:
        step(slug, batch)
    ours = calls[0]

    # same latent frame count (1.5: 3 -> 4) and channels (I2V: 16 noisy + 16 image)
    assert ours["hidden_states"].shape == theirs["hidden_states"].shape
    assert ours["hidden_states"].shape[1] == padded_frame_count(latent_frames(frames), v.patch_size_t)
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


@pytest.mark.parametrize("slug", I2V)
def test_image_conditioning_matches_prepare_latents(slug, monkeypatch):
    pipe = tiny_pipeline(slug)
    _, height, width = native_size(slug)
    image_latent = torch.randn(1, LATENT_CHANNELS, 1, height // 8, width // 8)
    theirs = run_pipeline_one_step(pipe, slug, monkeypatch, image_latent=image_latent)
    condition = theirs["hidden_states"][:, :, LATENT_CHANNELS:]

    ours = image_conditioning(
        image_latent, condition.shape[1], pipe.vae.config.scaling_factor, pipe.vae.config.invert_scale_latents
    )
    torch.testing.assert_close(ours, condition)
    # image at frame 0, zeros elsewhere, even for 1.5's padded 4 frames (no second copy of the image)
    assert ours[:, 0].abs().sum() > 0 and ours[:, 1:].abs().sum() == 0


@pytest.mark.parametrize("slug", GEN_15)
def test_15_padding_is_at_the_front_like_the_pipeline(slug, monkeypatch):
    """The pipeline decodes ``latents[:, additional_frames:]``: the padding it drops is at the front."""
    pipe = tiny_pipeline(slug)
    _, height, width = native_size(slug)
    final, decoded = [], []

    def keep_final(pipeline, i, t, kwargs):
        final.append(kwargs["latents"])
        return {}

    def decode(latents):  # record what is decoded; a blank video stands in for the VAE's output
        decoded.append(latents)
        return torch.zeros(1, 3, 9, height, width)

    monkeypatch.setattr(pipe, "decode_latents", decode)
    image_latent = torch.randn(1, LATENT_CHANNELS, 1, height // 8, width // 8)
    run_pipeline_one_step(
        pipe, slug, monkeypatch, image_latent=image_latent, output_type="pt", callback_on_step_end=keep_final
    )

    clip_frames = latent_frames(9)
    padding = padded_frame_count(clip_frames, 2) - clip_frames
    assert (final[0].shape[1], decoded[0].shape[1]) == (clip_frames + padding, clip_frames) == (4, 3)
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


@pytest.mark.parametrize("slug", ["5b", "1.5-5b-i2v"])
def test_noisy_latents_and_target_come_from_the_scheduler(slug, monkeypatch):
    pipe = tiny_pipeline(slug)
    scheduler = pipe.scheduler
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
