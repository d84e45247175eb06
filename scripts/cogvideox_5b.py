"""CogVideoX-5b at its published size with nothing to download, for `bench_train.py`: its configs, random
weights drawn directly on the device, and a step's memory counted on the meta device.
"""

from __future__ import annotations

import json
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from cogtune.shared.models import Model
from cogtune.shared.variants import get_variant
from cogtune.shared.zoo import scheduler_config, tiny_tokenizer
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary
from transformers import T5Config, T5EncoderModel

# CogVideoX-5b as published (THUDM/CogVideoX-5b, subfolders transformer/, vae/, text_encoder/): what the
# configs set; every other key keeps the diffusers / transformers default, as in the release.
TRANSFORMER_5B = dict(
    num_attention_heads=48, attention_head_dim=64, num_layers=42, in_channels=16, out_channels=16,
    text_embed_dim=4096, time_embed_dim=512, sample_frames=49, sample_height=60, sample_width=90, patch_size=2,
    max_text_seq_length=226, use_rotary_positional_embeddings=True,
)
VAE_5B = dict(
    block_out_channels=(128, 256, 256, 512), latent_channels=16, layers_per_block=3, norm_num_groups=32,
    temporal_compression_ratio=4, sample_height=480, sample_width=720, scaling_factor=0.7,
)
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False,
)


@dataclass
class RandomWeightsModel(Model):
    """A model folder of configs only; each load builds the component on the meta device, then draws its
    weights directly on `device` in the dtype asked for: no checkpoint read, no float32 copy on the host.

    With `device` "meta" nothing is allocated (`--dry-run`). Each component draws from its own seed, so every
    subprocess of a benchmark builds the same weights.
    """

    device: str = "cpu"
    seed: int = 0

    def load_transformer(self, dtype: torch.dtype = torch.float32):
        with torch.device("meta"):
            transformer = CogVideoXTransformer3DModel.from_config(self.config("transformer"))
        return materialize(transformer, self.device, dtype, self.seed)

    def load_vae(self, dtype: torch.dtype = torch.float32):
        with torch.device("meta"):
            vae = AutoencoderKLCogVideoX.from_config(self.config("vae"))
        return materialize(vae, self.device, dtype, self.seed + 1).eval()

    def load_text_encoder(self, dtype: torch.dtype = torch.float32):
        with torch.device("meta"):
            text_encoder = T5EncoderModel(T5Config.from_dict(self.config("text_encoder")))
        return materialize(text_encoder, self.device, dtype, self.seed + 2).eval()


def materialize(module: torch.nn.Module, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Give a meta-device `module` storage on `device` in `dtype` and random weights: matrices and kernels
    N(0, 1/fan_in) (activations keep their scale through the layers), norm scales 1, biases 0."""
    module.to(dtype)
    if device == "meta":
        return module
    module.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0.0, parameter[0].numel() ** -0.5, generator=generator)
            else:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
    return module


def write_5b_model(folder: Path) -> Path:
    """CogVideoX-5b as a diffusers folder of configs only (no weights): what check_run and the loaders read.

    The tokenizer is the tiny one (offline): the baseline's T5 still runs on the 226 padded tokens the real
    one gives, so its cost is the same.
    """
    v = get_variant("5b")
    with torch.device("meta"):
        CogVideoXTransformer3DModel.from_config(TRANSFORMER_5B).save_config(folder / "transformer")
        AutoencoderKLCogVideoX.from_config(VAE_5B).save_config(folder / "vae")
    T5Config(**T5_XXL).save_pretrained(folder / "text_encoder")
    tiny_tokenizer().save_pretrained(folder / "tokenizer")
    CogVideoXDDIMScheduler(**scheduler_config(v)).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": v.pipeline_class,
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


class MetaMemory(TorchDispatchMode):
    """Bytes of meta-device tensors alive, and their peak, counted op by op: a storage counts from the op that
    makes it until it is freed. What CUDA would allocate for the same ops, before its allocator's rounding
    and caching. Tensors made before the mode are counted when given to the constructor."""

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        self.live = self.peak = 0
        self._counted = WeakIdKeyDictionary()
        for tensor in tensors:
            self._count(tensor)

    def _count(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != "meta":  # e.g. --offload-checkpoints' host copies
            return
        storage = tensor.untyped_storage()
        if storage in self._counted:
            return
        size = storage.nbytes()
        self._counted[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._count, out)
        return out


@contextmanager
def flash_attention_on_meta():
    """On the meta device `F.scaled_dot_product_attention` takes the math path, which makes a full attention
    matrix per head (tens of GB at 49x480x720); CUDA runs these shapes with flash attention, which keeps the
    output and one log-sum-exp per row. Meta-device calls go to the flash kernel's meta function instead."""
    original = F.scaled_dot_product_attention

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type != "meta" or attn_mask is not None or kwargs:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                  scale=scale)[0]

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
