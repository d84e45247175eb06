"""Validation videos during training: the diffusers pipeline run on the transformer being trained.

The pipeline is the one users will run (`Model.pipeline_class`), built around the training transformer itself,
so a validation video shows exactly what the current weights produce at inference. The text encoder is never
loaded: the store holds the T5 embeddings of the validation prompts and of the empty prompt (the negative
prompt of classifier-free guidance), computed by cogprep exactly as the pipeline would. The VAE is loaded for
the call only and freed after it, so it costs no GPU memory between validations.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..shared.errors import CogtuneError
from ..shared.models import Model
from ..shared.store import Manifest, read_extras
from ..shared.video import write_video
from .outputs import unwrap_model
from .plots import write_contact_sheet

GUIDANCE_SCALE = 6.0
"""Classifier-free guidance scale of the THUDM examples and the pipelines' default."""


def run_validation(
    transformer: torch.nn.Module,
    model: Model,
    store: Path,
    out_dir: Path,
    step: int,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int,
    num_inference_steps: int,
    num_frames: int | None,
    height: int | None,
    width: int | None,
    write: bool = True,
    progress: Any = None,
) -> list[Path]:
    """Render one video per validation prompt of `store` to ``out_dir/validation/step-XXXXXX-{i}.mp4``.

    Returns the paths written; [] when the store has no validation prompts, or with `write` False (a rank
    that takes part in generating with sharded weights and leaves the writing to rank 0). `num_frames`,
    `height` and `width` default to the store's most common bucket (`most_common_bucket`, what the trainer
    passes). Every prompt starts from the same noise (`seed`) at every step, so videos of different steps differ
    only by what training changed. The transformer is put in eval mode for generation and given back in the
    mode it came in. `progress` (a `train.progress.RunProgress`) announces the round and follows each denoising
    step.
    """
    tensors, metadata = read_extras(Path(store))
    prompts = json.loads(metadata.get("validation_prompts") or "[]")
    if not prompts:
        return []
    size = _video_size(model, Path(store), num_frames, height, width)
    images = None
    if model.variant.task == "i2v":
        resize = Manifest.load(store).settings.get("resize", "crop")
        images = validation_images(tensors, len(prompts), store, size[1], size[2], resize)
    announced = progress.validation(step, len(prompts), num_inference_steps) if progress else nullcontext()
    with announced as on_step:  # announced before the VAE loads: that takes a while too
        return _render(transformer, model, prompts, tensors, images, size, out_dir, step, device, dtype, seed,
                       num_inference_steps, write, on_step)


def _render(transformer, model, prompts, tensors, images, size, out_dir, step, device, dtype, seed,
            num_inference_steps, write, on_step) -> list[Path]:
    """`run_validation`'s videos and contact sheet; `on_step`: the pipeline's ``callback_on_step_end``."""
    from diffusers.training_utils import free_memory  # imports the pipelines: only when validating

    net = unwrap_model(transformer)
    was_training = net.training
    vae = model.load_vae(dtype, device)
    _, frame_height, frame_width = size
    tile_large_frames(vae, frame_height, frame_width)
    pipe = model.pipeline_class()(
        tokenizer=None, text_encoder=None, vae=vae, transformer=net, scheduler=model.load_scheduler()
    )
    pipe.set_progress_bar_config(disable=True)
    net.eval()
    try:
        paths, videos = [], []
        for i in range(len(prompts)):
            frames = _generate(pipe, tensors, i, images, size, device, dtype, seed, num_inference_steps, on_step)
            if write:
                path = Path(out_dir) / "validation" / f"step-{step:06d}-{i}.mp4"
                write_video(path, frames, fps=model.variant.fps)
                paths.append(path)
                videos.append(frames)
        if write:  # every prompt's video at a glance: a row of frames across the clip each
            paths.append(write_contact_sheet(Path(out_dir) / "validation" / f"step-{step:06d}.png", videos, prompts))
    finally:
        net.train(was_training)
        del pipe, vae
        free_memory()  # diffusers': garbage collection, then the accelerator's cache
    return paths


def tile_large_frames(vae, height: int, width: int) -> None:
    """Turn on the VAE's spatial tiling for frames of at least its sample size.

    A full-size video through the VAE untiled takes more memory than the training step. Frames smaller than the
    sample size (which the tiles are cut from) need no tiling, and would leave remainder tiles too small for
    the VAE's convolutions.
    """
    if height >= vae.config.sample_height and width >= vae.config.sample_width:
        vae.enable_tiling()


def _generate(pipe, tensors, index, images, size, device, dtype, seed, num_inference_steps,
              on_step=None) -> np.ndarray:
    """One validation video as uint8 [F, H, W, 3], from prompt `index`'s cached embedding; `on_step` is called
    after each denoising step."""
    num_frames, height, width = size
    kwargs = dict(
        prompt_embeds=tensors[f"validation_embedding_{index}"][None].to(device, dtype),
        negative_prompt_embeds=tensors["empty_embedding"][None].to(device, dtype),
        num_frames=num_frames,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=GUIDANCE_SCALE,
        # a CPU generator draws the same noise on any device
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        callback_on_step_end=on_step,
    )
    if images is not None:
        kwargs["image"] = images[index]
    # Training may keep float32 weights (full fine-tune master weights, LoRA factors) beside `dtype` inputs;
    # autocast runs the mix as the training step did.
    reduced = dtype != torch.float32
    autocast = torch.autocast(torch.device(device).type, dtype=dtype) if reduced else nullcontext()
    with autocast:
        video = pipe(**kwargs).frames[0]  # float [F, H, W, 3] in [0, 1]
    return (np.asarray(video) * 255).round().clip(0, 255).astype(np.uint8)


def most_common_bucket(manifest: Manifest) -> tuple[int, int, int]:
    """(frames, height, width) of the bucket with the most samples: what validation videos are made at."""
    bucket = max(manifest.buckets, key=lambda b: (b["samples"], b["name"]))
    return bucket["frames"], bucket["height"], bucket["width"]


def _video_size(
    model: Model, store: Path, num_frames: int | None, height: int | None, width: int | None
) -> tuple[int, int, int]:
    """(frames, height, width) to render: the arguments given, else the store's most common bucket, else native."""
    manifest = Manifest.load(store)
    default = most_common_bucket(manifest) if manifest.buckets else model.native_size()
    size = (num_frames or default[0], height or default[1], width or default[2])
    model.check_size(*size, "validation size")
    return size


def check_validation_inputs(model: Model, store: Path) -> None:
    """Refuse at the start what the first validation would fail on, hours into a run: an image-to-video
    store whose validation prompts lack their images."""
    tensors, metadata = read_extras(Path(store))
    prompts = json.loads(metadata.get("validation_prompts") or "[]")
    if prompts and model.variant.task == "i2v":
        _missing_images(tensors, len(prompts), store)


def validation_images(tensors: dict[str, torch.Tensor], count: int, store: Path, height: int, width: int,
                      resize: str) -> list:
    """The I2V conditioning images, one per prompt, as PIL images of exactly height x width, made as cogprep
    makes a training clip's first frame (`resize_to_bucket` with the store's resize mode: cover, then centre
    crop, by default). Handed the raw image, the pipeline's VideoProcessor would stretch it to height x width:
    the model would be validated on a condition shaped unlike any it trained on."""
    from PIL import Image

    from ..preprocess.frames import resize_to_bucket

    _missing_images(tensors, count, store)
    return [Image.fromarray(resize_to_bucket(tensors[f"validation_image_{i}"].numpy()[None], height, width,
                                             resize)[0]) for i in range(count)]


def _missing_images(tensors: dict[str, torch.Tensor], count: int, store: Path) -> None:
    missing = [i for i in range(count) if f"validation_image_{i}" not in tensors]
    if missing:
        raise CogtuneError(
            f"{store}: an image-to-video model needs one validation image per validation prompt, "
            f"{len(missing)} of {count} missing (re-run cogprep encode with --validation-images)"
        )
