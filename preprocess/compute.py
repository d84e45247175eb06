"""cogprep's torch work: decode workers, the T5 and VAE encodes, the compute device, and preview decodes.

The only module of `cogtune.preprocess` that imports torch, and it is imported where there is such work, so
``cogprep status``, ``gc``, ``verify`` and a no-op encode never load torch. `frames.resize_to_bucket` keeps its
own lazy import: train/validation.py and the tests use it as a frame-sampling function.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..shared import store as S
from ..shared.errors import CogtuneError
from ..shared.models import Model, parse_dtype
from ..shared.video import read_frames
from .encode import latent_grid
from .frames import resize_to_bucket
from .plan import INPUT_ERRORS, EncodeSettings, VideoJob


def barrier() -> None:
    """Wait for every rank of a multi-process encode (gloo: ranks need no GPU to meet)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()


def compute_device(device: str, compute_dtype: str, local_rank: int) -> tuple[torch.device, torch.dtype]:
    """Where and in what dtype the VAE and T5 run: ``auto`` is cuda:LOCAL_RANK in bfloat16, else cpu in float32."""
    if device == "auto":
        where = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        where = torch.device(device)
    if compute_dtype != "auto":
        return where, parse_dtype(compute_dtype)
    return where, torch.float32 if where.type == "cpu" else torch.bfloat16


def encode_prompts(tokenizer, text_encoder, captions: list[str], max_length: int, device) -> tuple[list, list[int]]:
    """T5 embeddings exactly as the pipeline's ``_get_t5_prompt_embeds`` makes them (padded to `max_length`,
    no attention mask), and each caption's true token count."""
    inputs = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        embeds = text_encoder(inputs.input_ids.to(device))[0]
    return list(embeds.float().cpu()), [int(n) for n in inputs.attention_mask.sum(1)]


def encode_video_item(vae, decoded: dict, job: VideoJob, settings: EncodeSettings, device, compute, storage):
    """The members of one video item, tensors on the CPU (packed by the encode's packer): posterior mean and
    logvar of the clip, and the I2V image latents."""
    frames = decoded["frames"]  # uint8 [F, H, W, 3]
    x = frames.permute(3, 0, 1, 2).unsqueeze(0).to(device, compute) / 127.5 - 1.0
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
    check_latent_shape(vae, tuple(frames.shape[:3]), tuple(posterior.mean.shape[2:]), job.path)
    members: dict[str, Any] = {
        S.LATENT: {S.MEAN: posterior.mean[0].to(storage).cpu(), S.LOGVAR: posterior.logvar[0].to(storage).cpu()},
        S.META: json.dumps({"source": str(job.path), "bucket": job.bucket.name, "clip_start": job.window.start,
                            "clip_step": job.window.stride}).encode(),
    }
    if settings.image_noise_variants > 0:
        members[S.IMAGE] = encode_image_variants(vae, decoded["image"], job.key, settings, device, compute, storage)
        image = decoded["image"]  # uint8 [H, W, 3]
        check_latent_shape(vae, (1, *image.shape[:2]), tuple(members[S.IMAGE][S.CLEAN].shape[1:]), job.path)
    return members


def check_latent_shape(vae, pixels: tuple[int, int, int], latents: tuple[int, ...], source: Path) -> None:
    """The VAE must give (F-1)/4+1 latent frames of H/8 x W/8 for F x H x W pixels, as the pipelines assume.
    Its tiled encode can miss by a row or column (seen with small tile sizes): refuse before caching that."""
    expected = latent_grid(vae.config, pixels)
    if latents != expected:
        hint = ": encode without --vae-tiling" if getattr(vae, "use_tiling", False) else ""
        raise CogtuneError(f"{source}: the VAE gave latents of {'x'.join(map(str, latents))} for "
                           f"{'x'.join(map(str, pixels))} pixels, expected {'x'.join(map(str, expected))}{hint}")


def encode_image_variants(vae, image: torch.Tensor, key: str, settings: EncodeSettings, device, compute, storage):
    """The I2V conditioning image, VAE-encoded as a 1-frame video: the clean posterior mean, and K encodings of
    the image with pixel-space noise sigma = exp(N(-3, 0.5)) (the augmentation the trainer draws from)."""
    k = settings.image_noise_variants
    gen = torch.Generator().manual_seed((int(key[:15], 16) + settings.seed) % (2**63))
    pixels = image.permute(2, 0, 1).float() / 127.5 - 1.0  # [3, H, W]
    sigma = torch.exp(torch.randn(k, generator=gen) * 0.5 - 3.0)
    noisy = pixels[None] + sigma[:, None, None, None] * torch.randn((k, *pixels.shape), generator=gen)
    batch = torch.cat([pixels[None], noisy]).unsqueeze(2).to(device, compute)  # [K+1, 3, 1, H, W]
    with torch.no_grad():
        posterior = vae.encode(batch).latent_dist
        samples = posterior.sample(generator=gen)
    return {S.CLEAN: posterior.mean[0].to(storage).cpu(), S.NOISY: samples[1:].to(storage).cpu(),
            S.SIGMA: sigma.float()}


def extras_tensors(tokenizer, text_encoder, text_length: int, prompts: list[str], images: list[Path], device,
                   storage) -> dict[str, torch.Tensor]:
    """extras.safetensors' tensors: the empty prompt's embedding, each validation prompt's, each validation
    image's pixels (uint8 [H, W, 3])."""
    embeds, _ = encode_prompts(tokenizer, text_encoder, [""] + prompts, text_length, device)
    tensors = {"empty_embedding": embeds[0].to(storage)}
    for i, e in enumerate(embeds[1:]):
        tensors[f"validation_embedding_{i}"] = e.to(storage)
    for i, p in enumerate(images):
        tensors[f"validation_image_{i}"] = torch.from_numpy(read_frames(p, [0])[0].copy())
    return tensors


class DecodeJobs:
    """Decode + resize in DataLoader workers. A damaged or unreadable file comes back as an error string; any
    other exception is a bug and propagates (from a worker process the DataLoader raises it again here)."""

    def __init__(self, jobs: list[VideoJob], resize: str, i2v: bool):
        self.jobs, self.resize, self.i2v = jobs, resize, i2v

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> dict:
        job = self.jobs[i]
        b = job.bucket
        try:
            frames = resize_to_bucket(read_frames(job.path, job.window.indices), b.height, b.width, self.resize)
            out = {"index": i, "frames": torch.from_numpy(frames)}
            if self.i2v:
                first = read_frames(job.image, [0]) if job.image is not None else frames[:1]
                out["image"] = torch.from_numpy(resize_to_bucket(first, b.height, b.width, self.resize)[0])
            return out
        except INPUT_ERRORS as e:
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            return {"index": i, "error": text if str(job.path) in text else f"{job.path}: {text}"}


def _keep(x):
    return x


def decoded(jobs: list[VideoJob], resize: str, i2v: bool, workers: int, progress: bool):
    """(job, decoded clip) in job order, decoded by `workers` processes (0: in this one)."""
    loader = torch.utils.data.DataLoader(
        DecodeJobs(jobs, resize, i2v), batch_size=None, shuffle=False, num_workers=workers,
        collate_fn=_keep, prefetch_factor=4 if workers else None, persistent_workers=False,
    )
    for item in tqdm(loader, total=len(jobs), desc="clips", unit="clip", disable=not progress):
        yield jobs[item["index"]], item


def preview_vae(model: Model):
    """The model's VAE for previews: bfloat16 on the GPU when there is one, float32 on the CPU."""
    if torch.cuda.is_available():
        return model.load_vae(torch.bfloat16, "cuda")
    return model.load_vae(torch.float32)


def decode_first_frames(store: Path, rows: list[dict[str, Any]], vae) -> list[np.ndarray]:
    """The first frame of each row's clip, decoded from its cached latent mean through `vae`: uint8 [H, W, 3].

    The store holds the *unscaled* posterior, which is what `vae.decode` takes (the pipelines divide by
    scaling_factor before decoding), so the mean goes in as it is.
    """
    reader = S.ShardReader(store)
    frames = []
    try:
        for r in rows:
            mean = reader.tensors(r["shard"], r["latent_offset"], r["latent_size"])[S.MEAN]
            frames.append(decode_first_frame(vae, mean.to(vae.device, vae.dtype)))
    finally:
        reader.close()
    return frames


def decode_first_frame(vae, mean: torch.Tensor) -> np.ndarray:
    """The first frame of the clip whose latent mean is `mean` [C, F, H, W], as uint8 [H, W, 3]."""
    # The VAE decodes latent frames in batches (the first one takes the odd remainder) and carries a causal conv
    # cache forward, so the first batch decodes alone to exactly the frames a full decode starts with.
    batch = vae.num_latent_frames_batch_size
    head = mean[:, : batch + mean.shape[1] % batch]
    with torch.no_grad():
        video = vae.decode(head[None]).sample  # [1, 3, F, H, W] in [-1, 1]
    frame = (video[0, :, 0].float() / 2 + 0.5).clamp(0, 1) * 255  # as the pipelines' video processor does
    return frame.round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
