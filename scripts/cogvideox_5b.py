"""CogVideoX (2b, 5b, 5b-I2V, 1.5-5B, 1.5-5B-I2V) at its published size with nothing to download, for
`bench_train.py`: the configs, random weights drawn directly on the device, and a step's memory counted on the
meta device.
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

# The other releases' transformer/config.json and vae/config.json (THUDM/CogVideoX-2b, THUDM/CogVideoX-5b-I2V,
# THUDM/CogVideoX1.5-5B, THUDM/CogVideoX1.5-5B-I2V on the Hugging Face hub, as diffusers'
# scripts/convert_cogvideox_to_diffusers.py writes them), as differences from 5b's:
# - 2b: 30 heads of 64 (1920 wide), 30 layers, the fixed 3D sin-cos table instead of rotary embeddings; its VAE
#   scales latents by 1.15258426;
# - 5b-I2V: the image latent concatenated on the channels (in_channels 32), and a learned positional table beside
#   the rotary embeddings (use_learned_positional_embeddings), sized for 49x480x720 only;
# - 1.5-5B: 2-frame temporal patches (patch_size_t 2) without a patch bias, and a RoPE grid of 300x300 latents
#   (sample_height/width: the grid's maximum, not a training size), 81 frames; its VAE's I2V latent is divided
#   by the scaling factor (invert_scale_latents);
# - 1.5-5B-I2V: as 1.5-5B with in_channels 32 and the ofs embedding (ofs_embed_dim 512, the time embedding's width).
# The parameter counts these give (5.57 B for 5b, 1.69 B for 2b) match the releases' safetensors files.
TRANSFORMER_2B = {**TRANSFORMER_5B, "num_attention_heads": 30, "num_layers": 30,
                  "use_rotary_positional_embeddings": False}
TRANSFORMER_5B_I2V = {**TRANSFORMER_5B, "in_channels": 32, "use_learned_positional_embeddings": True}
TRANSFORMER_15_5B = {**TRANSFORMER_5B, "patch_size_t": 2, "patch_bias": False, "sample_frames": 81,
                     "sample_height": 300, "sample_width": 300}
TRANSFORMER_15_5B_I2V = {**TRANSFORMER_15_5B, "in_channels": 32, "ofs_embed_dim": 512}
VAE_2B = {**VAE_5B, "scaling_factor": 1.15258426}
VAE_15 = {**VAE_5B, "invert_scale_latents": True}
REAL_CONFIGS = {
    "2b": (TRANSFORMER_2B, VAE_2B),
    "5b": (TRANSFORMER_5B, VAE_5B),
    "5b-i2v": (TRANSFORMER_5B_I2V, VAE_5B),
    "1.5-5b": (TRANSFORMER_15_5B, VAE_15),
    "1.5-5b-i2v": (TRANSFORMER_15_5B_I2V, VAE_15),
}
"""(transformer, VAE) configs by variant slug (shared.variants); T5-XXL is the same for all five."""
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

    def load_vae(self, dtype: torch.dtype = torch.float32, device: str | None = None):
        with torch.device("meta"):
            vae = AutoencoderKLCogVideoX.from_config(self.config("vae"))
        return materialize(vae, str(device or self.device), dtype, self.seed + 1).eval()

    def load_text_encoder(self, dtype: torch.dtype = torch.float32, device: str | None = None):
        with torch.device("meta"):
            text_encoder = T5EncoderModel(T5Config.from_dict(self.config("text_encoder")))
        return materialize(text_encoder, str(device or self.device), dtype, self.seed + 2).eval()


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


def write_real_model(folder: Path, slug: str = "5b") -> Path:
    """The release `slug` (a key of REAL_CONFIGS) as a diffusers folder of configs only (no weights): what
    check_run and the loaders read.

    The tokenizer is the tiny one (offline): the baseline's T5 still runs on the 226 padded tokens the real
    one gives, so its cost is the same.
    """
    v = get_variant(slug)
    transformer_config, vae_config = REAL_CONFIGS[slug]
    with torch.device("meta"):
        CogVideoXTransformer3DModel.from_config(transformer_config).save_config(folder / "transformer")
        AutoencoderKLCogVideoX.from_config(vae_config).save_config(folder / "vae")
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


class MetaAdamW8bit(torch.optim.Optimizer):
    """bitsandbytes' AdamW8bit as far as memory goes, for counting on the meta device, where its CUDA kernels
    cannot run: the state it makes at the first step, and no update (nothing to compute on the meta device).

    The layout is bitsandbytes' `Optimizer2State.init_state` with its defaults: a tensor of 4,096 elements or more
    (`min_8bit_size`) gets its two moments as uint8 (1 byte an element each) plus a float32 absmax per block of
    256 elements for each (blockwise quantization), so about 2.03 bytes a parameter; a smaller one keeps float32
    moments (8 bytes an element). Its update is one fused kernel in place: no temporaries to count.
    """

    MIN_8BIT_SIZE = 4096
    BLOCK = 256

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or self.state[p]:
                    continue
                state = self.state[p]
                if p.numel() < self.MIN_8BIT_SIZE:
                    state["state1"] = torch.zeros_like(p, dtype=torch.float32)
                    state["state2"] = torch.zeros_like(p, dtype=torch.float32)
                    continue
                blocks = -(-p.numel() // self.BLOCK)
                for moment in ("1", "2"):
                    state["state" + moment] = torch.zeros_like(p, dtype=torch.uint8)
                    state["absmax" + moment] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
