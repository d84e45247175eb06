"""Build a small store of random tensors with the store API directly, for tests that need one without encoding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from cogtune.shared import store as S

LATENT_CHANNELS = 4
TEXT_LENGTH = 6
TEXT_DIM = 8


def _bucket_shape(name: str) -> tuple[int, int, int]:
    frames, height, width = (int(x) for x in name.split("x"))
    return frames, height, width


def build_random_store(
    path: Path,
    buckets: dict[str, tuple[int, int]],
    i2v: bool = False,
    K: int = 3,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Write a store at `path` holding random tensors; returns its index rows in index order.

    `buckets` maps a bucket name ``FxHxW`` to ``(samples, batch_size)``. Latents are [4, (F-1)//4+1, H/8, W/8],
    embeddings [6, 8], one text item per sample; with `i2v` every video item also holds clean [4, 1, H/8, W/8],
    `K` noisy variants and their sigmas. Tensors are bfloat16 like a real store, sigmas float32.
    """
    path = Path(path)
    gen = torch.Generator().manual_seed(seed)
    text_writer = S.ShardWriter(path, S.TEXT_BUCKET, prefix="test", max_items=4)
    rows: list[dict[str, Any]] = []
    manifest_buckets = []
    sample_number = 0
    for bucket, (samples, batch_size) in buckets.items():
        frames, height, width = _bucket_shape(bucket)
        latent_shape = (LATENT_CHANNELS, (frames - 1) // 4 + 1, height // 8, width // 8)
        # max_items=2 spreads a bucket over several shards, as a real store does
        video_writer = S.ShardWriter(path, bucket, prefix="test", max_items=2)
        for _ in range(samples):
            video_key = f"{sample_number:016x}{0:016x}"
            text_key = f"{sample_number:016x}{1:016x}"
            caption = f"random sample {sample_number}"
            members = {
                S.LATENT: S.tensors_to_bytes(
                    {
                        "mean": torch.randn(latent_shape, generator=gen).bfloat16(),
                        "logvar": torch.randn(latent_shape, generator=gen).bfloat16(),
                    }
                ),
                S.META: json.dumps({"sample": sample_number}).encode(),
            }
            if i2v:
                image_shape = (LATENT_CHANNELS, 1, *latent_shape[2:])
                members[S.IMAGE] = S.tensors_to_bytes(
                    {
                        "clean": torch.randn(image_shape, generator=gen).bfloat16(),
                        "noisy": torch.randn((K, *image_shape), generator=gen).bfloat16(),
                        "sigma": torch.rand(K, generator=gen),
                    }
                )
            video = video_writer.add(video_key, members)
            text = text_writer.add(
                text_key,
                {
                    S.TEXT: S.tensors_to_bytes(
                        {"embedding": torch.randn(TEXT_LENGTH, TEXT_DIM, generator=gen).bfloat16()}
                    ),
                    S.META: json.dumps({"caption": caption, "tokens": 4}).encode(),
                },
            )
            rows.append(
                {
                    "key": f"{sample_number:032x}",
                    "source": f"videos/{sample_number}.mp4",
                    "kind": "video",
                    "bucket": bucket,
                    "frames": frames,
                    "height": height,
                    "width": width,
                    "caption": caption,
                    "clip_start": 0,
                    "clip_step": 1.0,
                    "source_size": 1000 + sample_number,
                    "source_mtime_ns": 1,
                    "source_hash": f"hash{sample_number}",
                    "video_key": video_key,
                    "text_key": text_key,
                    "shard": video[S.LATENT].shard,
                    "latent_offset": video[S.LATENT].offset,
                    "latent_size": video[S.LATENT].size,
                    "image_offset": video[S.IMAGE].offset if i2v else -1,
                    "image_size": video[S.IMAGE].size if i2v else 0,
                    "text_shard": text[S.TEXT].shard,
                    "text_offset": text[S.TEXT].offset,
                    "text_size": text[S.TEXT].size,
                    "text_tokens": 4,
                }
            )
            sample_number += 1
        video_writer.close()
        manifest_buckets.append(
            {
                "name": bucket,
                "frames": frames,
                "height": height,
                "width": width,
                "batch_size": batch_size,
                "samples": samples,
            }
        )
    text_writer.close()
    S.write_index(path, rows)
    S.Manifest(
        model={"variant": "random-test"},
        settings={"noise_variants": K if i2v else 0},
        dataset={"path": "random"},
        buckets=manifest_buckets,
    ).save(path)
    return S.read_index(path)
