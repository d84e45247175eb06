"""The training math of cogtune: what the transformer is fed and what it must predict, per training step.

Every function mirrors a piece of the diffusers CogVideoX pipelines (``CogVideoXPipeline``,
``CogVideoXImageToVideoPipeline``, diffusers 0.42), the real client of a trained model: training feeds the
transformer exactly what those pipelines feed it at inference. Each docstring names the code it mirrors, and
``tests/test_train_math.py`` checks each one against that code running, for all five variants.

Layouts: the cache holds VAE posteriors as the VAE gives them, [C, F, H, W] per sample (stacked to
[B, C, F, H, W]); the transformer takes [B, F, C, H, W]. Latents are 8x smaller than pixels in H and W and
4x in time: 8N+1 pixel frames give 2N+1 latent frames.

CogVideoX 1.5 (``patch_size_t`` 2) needs an even latent frame count. The pipelines make one by adding
``additional_frames`` at the *front* of the latents and dropping ``latents[:, additional_frames:]`` before
decoding (``__call__``, step 5 and the end). For ``num_frames=9`` (3 latent frames) the transformer sees 4
latent frames; frame 0 is never shown, frames 1..3 become the 9 output frames. Training therefore prepends a
copy of the first latent frame (`pad_latent_frames`), so frames 1..3 are the clip and frame 0 is a
plausible neighbour of frame 1. In the I2V pipeline the padding happens before ``prepare_latents`` builds the
image condition, so the image latent sits at frame 0 of the *padded* sequence with zeros at frames 1..3
(`image_conditioning` takes the padded count).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.utils.torch_utils import randn_tensor

from ..shared.variants import detect_variant

OFS_VALUE = 2.0
"""The ``ofs`` the pipelines pass to 1.5-I2V (``latents.new_full((1,), fill_value=2.0)``)."""


def sample_latents(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    scaling_factor: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw a fresh VAE posterior sample, scaled for the transformer: [B, C, F, H, W] -> x0 [B, F, C, H, W], float32.

    Mirrors ``DiagonalGaussianDistribution.sample`` (the VAE's ``latent_dist``: same logvar clamp, one
    ``randn_tensor`` of the mean's shape) followed by the ``* scaling_factor`` the pipelines undo in
    ``decode_latents`` (``1 / scaling_factor``, for every variant).
    """
    mean, logvar = mean.float(), logvar.float()
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return ((mean + std * eps) * scaling_factor).permute(0, 2, 1, 3, 4)


def padded_frame_count(num_latent_frames: int, patch_size_t: int | None) -> int:
    """Latent frames the transformer sees for `num_latent_frames` of video: the next multiple of ``patch_size_t``.

    Mirrors ``latent_frames + additional_frames`` in the pipelines' ``__call__``.
    """
    return num_latent_frames + (-num_latent_frames) % (patch_size_t or 1)


def pad_latent_frames(x: torch.Tensor, patch_size_t: int | None) -> torch.Tensor:
    """Make the frame count of `x` [B, F, C, H, W] a multiple of ``patch_size_t`` by prepending copies of frame 0.

    The pipelines put their ``additional_frames`` first and discard ``latents[:, additional_frames:]`` on
    output, so the padding must be at the front for frames 1.. to line up with the clip (see the module doc).
    1.0 models (``patch_size_t`` None) are returned unchanged.
    """
    missing = padded_frame_count(x.shape[1], patch_size_t) - x.shape[1]
    if missing == 0:
        return x
    return torch.cat([x[:, :1].expand(-1, missing, -1, -1, -1), x], dim=1)


def image_conditioning(
    image_latent: torch.Tensor,
    num_frames: int,
    scaling_factor: float,
    invert_scale_latents: bool,
) -> torch.Tensor:
    """The I2V image condition: unscaled first-frame latent [B, C, 1, H, W] -> [B, num_frames, C, H, W], float32.

    Mirrors ``CogVideoXImageToVideoPipeline.prepare_latents`` as ``__call__`` runs it: the latent scaled by
    ``scaling_factor`` (or ``1 / scaling_factor`` when the VAE's ``invert_scale_latents`` is set), at frame 0,
    zeros for the other ``num_frames - 1`` frames. `num_frames` is the padded count (`padded_frame_count`):
    ``__call__`` pads before ``prepare_latents``, so its ``first_frame`` copy is always empty and 1.5 gets
    [image, 0, 0, 0] for 4 latent frames, not a second copy of the image.
    """
    scale = 1 / scaling_factor if invert_scale_latents else scaling_factor
    first = scale * image_latent.float().permute(0, 2, 1, 3, 4)
    zeros = first.new_zeros((first.shape[0], num_frames - 1, *first.shape[2:]))
    return torch.cat([first, zeros], dim=1)


def rotary_embeddings(
    transformer_config: Mapping[str, Any],
    latent_height: int,
    latent_width: int,
    num_latent_frames: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (cos, sin) rotary tables for latents of this size, or None when the model has no rotary embeddings.

    Mirrors ``CogVideoXPipeline._prepare_rotary_positional_embeddings(height, width, latents.size(1), device)``
    (the I2V pipeline's is a copy), from the transformer config alone. The pipeline's grid is
    ``height // (vae_scale_spatial * patch_size)``, which equals ``latent_height // patch_size`` since the
    pipeline's latent height is ``height // vae_scale_spatial``. `num_latent_frames` is the padded count.
    1.0: crop region of the grid inside the base grid ``sample_height/p x sample_width/p`` (linspace grid).
    1.5: ``grid_type="slice"`` with ``max_size`` = that base grid, over ``ceil(frames / patch_size_t)`` steps.
    """
    variant = detect_variant(transformer_config, where="transformer")
    if not variant.rotary:
        return None
    # head size, patch size and the base grid are the checkpoint's own (tiny models differ): no variant fact
    c = transformer_config
    return _rotary_tables(c["attention_head_dim"], c["patch_size"], variant.patch_size_t, c["sample_height"],
                          c["sample_width"], latent_height, latent_width, num_latent_frames, str(device))


def resize_crop_region_for_grid(grid: tuple[int, int], base_width: int, base_height: int
                                ) -> tuple[tuple[int, int], tuple[int, int]]:
    """The crop of the base grid the 1.0 rotary tables cover: ``get_resize_crop_region_for_grid`` of diffusers'
    ``pipelines/cogvideo/pipeline_cogvideox.py``, line for line. Copied, not imported: importing that module
    imports the pipelines (transformers, the LoRA loaders), seconds of start-up a run needs only to validate."""
    height, width = grid
    if height / width > base_height / base_width:
        resize_height, resize_width = base_height, int(round(base_height / height * width))
    else:
        resize_width, resize_height = base_width, int(round(base_width / width * height))
    top = int(round((base_height - resize_height) / 2.0))
    left = int(round((base_width - resize_width) / 2.0))
    return (top, left), (top + resize_height, left + resize_width)


@functools.lru_cache(maxsize=64)
def _rotary_tables(head_dim: int, p: int, p_t: int | None, sample_height: int, sample_width: int, latent_height: int,
                   latent_width: int, num_latent_frames: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached per shape: a run has a few buckets, and the tables are only read (never written) by the model."""
    grid_height, grid_width = latent_height // p, latent_width // p
    base_height, base_width = sample_height // p, sample_width // p
    if p_t is None:
        return get_3d_rotary_pos_embed(
            embed_dim=head_dim,
            crops_coords=resize_crop_region_for_grid((grid_height, grid_width), base_width, base_height),
            grid_size=(grid_height, grid_width),
            temporal_size=num_latent_frames,
            device=device,
        )
    return get_3d_rotary_pos_embed(
        embed_dim=head_dim,
        crops_coords=None,
        grid_size=(grid_height, grid_width),
        temporal_size=(num_latent_frames + p_t - 1) // p_t,
        grid_type="slice",
        max_size=(base_height, base_width),
        device=device,
    )


def ofs_tensor(
    transformer_config: Mapping[str, Any], batch_size: int, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor | None:
    """``ofs`` = 2.0 per sample [B] when the transformer has ``ofs_embed_dim`` (1.5-I2V), else None.

    Mirrors ``ofs_emb`` in ``CogVideoXImageToVideoPipeline.__call__``; the pipeline's shape (1,) broadcasts
    over the batch inside the transformer, one value per sample gives the same embedding and is explicit.
    """
    if not detect_variant(transformer_config, where="transformer").uses_ofs:
        return None
    return torch.full((batch_size,), OFS_VALUE, device=device, dtype=dtype)


def drop_captions(
    prompt_embeds: torch.Tensor,
    empty_prompt_embeds: torch.Tensor,
    probability: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Caption dropout: each sample's embedding [B, L, D] becomes the empty-prompt one [L, D] with `probability`.

    Trains the unconditional branch that classifier-free guidance uses: the pipelines encode the negative
    prompt (by default "") with the same ``_get_t5_prompt_embeds``, so the empty-prompt embedding must be
    cached exactly as the prompts are.
    """
    draws = torch.rand(prompt_embeds.shape[0], generator=generator, device=_generator_device(generator))
    dropped = (draws < probability).to(prompt_embeds.device)[:, None, None]
    return torch.where(dropped, empty_prompt_embeds.to(prompt_embeds), prompt_embeds)


RELEASE_IMAGE_DROPOUT = 0.05
"""Share of samples whose image condition the release's I2V training zeroed (SAT ``noised_image_dropout``)."""


def drop_images(
    image_latents: torch.Tensor,
    probability: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Image-condition dropout: each sample's image latent [B, C, 1, H, W] becomes zeros with `probability`.

    The release's I2V training zeroes the noised image latent of 5 % of samples (CogVideoX SAT, the 5b-I2V
    config's ``noised_image_dropout: 0.05``), so that the model keeps the path where the image says nothing.
    Zeros before `image_conditioning` scales them are zeros after.
    """
    draws = torch.rand(image_latents.shape[0], generator=generator, device=_generator_device(generator))
    dropped = (draws < probability).to(image_latents.device)[:, None, None, None, None]
    return torch.where(dropped, torch.zeros_like(image_latents), image_latents)


@dataclass
class TrainBatch:
    """One batch of cached tensors, on the training device."""

    latent_mean: torch.Tensor
    """VAE posterior mean, unscaled, [B, C, F, H, W] with F = 2N+1 (unpadded)."""
    latent_logvar: torch.Tensor
    """VAE posterior log-variance, same shape."""
    prompt_embeds: torch.Tensor
    """T5 embeddings as the pipeline computes them, [B, max_text_seq_length, D], in the transformer's dtype."""
    image_latents: torch.Tensor | None = None
    """I2V only: the first-frame latent drawn for this step, unscaled, [B, C, 1, H, W]."""


def training_step(
    transformer: torch.nn.Module,
    scheduler: Any,
    batch: TrainBatch,
    *,
    vae_scaling_factor: float,
    invert_scale_latents: bool,
    generator: torch.Generator | None = None,
    transformer_config: Mapping[str, Any] | None = None,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """One forward pass on `batch`; returns the float32 scalar v-prediction MSE loss, ready for backward.

    Mirrors one denoising step of the pipelines' ``__call__`` (steps 5-8: latents, I2V channel concat,
    rotary, ofs, ``transformer(..., return_dict=False)[0]``), with the noisy latents made from data:
    x0 = fresh posterior sample * scaling_factor, padded for 1.5; t uniform in [0, num_train_timesteps);
    ``x_t = scheduler.add_noise(x0, eps, t)``; target ``scheduler.get_velocity(x0, eps, t)``.
    ``scale_model_input`` is left out: it is the identity for both CogVideoX schedulers.
    Model inputs take ``prompt_embeds.dtype``, as the pipelines' latents do.

    `vae_scaling_factor` and `invert_scale_latents` come from the model's VAE config. `transformer_config`
    defaults to ``transformer.config``; pass it when `transformer` is a wrapper without one (DDP). `timesteps`
    [B] fixes t instead of drawing it (the held-out evaluation's fixed grid); the other draws are unchanged.
    """
    config = transformer.config if transformer_config is None else transformer_config
    variant = detect_variant(config, where="transformer")
    if (variant.task == "i2v") != (batch.image_latents is not None):
        need = "needs image_latents" if variant.task == "i2v" else "takes no image_latents"
        raise ValueError(f"{variant.name} ({variant.task}) {need}")
    device, dtype = batch.prompt_embeds.device, batch.prompt_embeds.dtype
    x0 = sample_latents(batch.latent_mean, batch.latent_logvar, vae_scaling_factor, generator)
    x0 = pad_latent_frames(x0, variant.patch_size_t)
    batch_size, num_frames, _, height, width = x0.shape

    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator,
                                  device=_generator_device(generator))
    timesteps = timesteps.to(device)
    noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    model_input = scheduler.add_noise(x0, noise, timesteps)
    target = scheduler.get_velocity(x0, noise, timesteps).to(device)
    if batch.image_latents is not None:
        condition = image_conditioning(batch.image_latents, num_frames, vae_scaling_factor, invert_scale_latents)
        model_input = torch.cat([model_input, condition], dim=2)
        del condition
    model_input = model_input.to(device, dtype)
    # of what this step made, only the input and the target live on through the forward pass, as in a bare loop
    del x0, noise

    prediction = transformer(
        hidden_states=model_input,
        encoder_hidden_states=batch.prompt_embeds,
        timestep=timesteps,
        ofs=ofs_tensor(config, batch_size, device, dtype),
        image_rotary_emb=rotary_embeddings(config, height, width, num_frames, device),
        return_dict=False,
    )[0]
    return F.mse_loss(prediction.float(), target)


def _generator_device(generator: torch.Generator | None) -> torch.device:
    """Where a draw from `generator` must happen (torch draws only on the generator's own device)."""
    return generator.device if generator is not None else torch.device("cpu")
