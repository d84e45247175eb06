"""``--base-weights fp8``: a LoRA run's frozen transformer weights stored in float8 (e4m3), each layer upcast to the
compute dtype for its own forward pass and cast back after it (diffusers' layerwise casting hooks).

For CogVideoX-5b that takes the frozen weights from 10.4 GiB (bfloat16) to 5.9 GiB: 4.76 B of its 5.57 B
parameters are in the linear layers cast here. The LoRA factors, their gradients and their optimizer state stay
float32, as in a bf16 run; only the base the adapter learns on is rounded to float8.
"""

from __future__ import annotations

import torch

from ..shared.errors import CogtuneError

STORAGE_DTYPE = torch.float8_e4m3fn
"""What the frozen layers are kept in between their forward passes."""

FULL_PRECISION_MODULES = (
    # diffusers' DEFAULT_SKIP_MODULES_PATTERN (diffusers/hooks/layerwise_casting.py) ...
    "pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$",
    # ... which CogVideoXTransformer3DModel._skip_layerwise_casting_patterns (["patch_embed", "norm"]) repeats;
    # finetrainers' default --layerwise_upcasting_skip_modules_pattern is the same list plus the x_embedder and
    # context_embedder CogVideoX lacks. Matched as regular expressions against module names: "norm" keeps every
    # norm and the adaptive-norm modulation linears inside them (transformer_blocks.N.norm1.linear, norm_out.linear)
    "time_embedding", "ofs_embedding",
    # the timestep (and 1.5-I2V ofs) embedding: 2 small linears whose output modulates every block, where float8
    # rounding would shift every layer at once; diffusers and finetrainers leave them to the storage dtype
)
"""Module-name patterns left in the compute dtype: the patch embedding, norms and modulation, time and ofs
embeddings, and the output projection. The precision-critical few; 15 % of CogVideoX-5b's weights."""


def store_frozen_weights_in_fp8(transformer: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Keep the frozen layers of `transformer` (with its LoRA already added) in float8, computing in
    `compute_dtype`.

    Called after ``add_adapter``, with peft's LoRA layer names among the skipped patterns. The order matters:
    casting enabled before the adapter exists makes peft create the LoRA factors in their base layer's float8
    (it follows the base weight's dtype), and diffusers adds peft's layer names to the skipped patterns only when
    no pattern is given. Cast after, the adapter stays in the training precision, and diffusers also turns off
    peft's cast of each LoRA layer's input to the adapter's dtype (``PeftInputAutocastDisableHook``).
    """
    from peft.tuners.lora.layer import LoraLayer

    if not hasattr(transformer, "enable_layerwise_casting"):  # cogtune runs on diffusers 0.32, which lacks it
        raise CogtuneError("--base-weights fp8: needs diffusers 0.33 or later (layerwise casting)")
    transformer.enable_layerwise_casting(
        storage_dtype=STORAGE_DTYPE,
        compute_dtype=compute_dtype,
        skip_modules_pattern=FULL_PRECISION_MODULES + tuple(LoraLayer.adapter_layer_names),
    )
    trained_in_fp8 = [name for name, p in transformer.named_parameters()
                      if p.requires_grad and p.dtype == STORAGE_DTYPE]
    if trained_in_fp8:  # a peft that renames its layers would otherwise train float8 factors without a word
        raise RuntimeError(f"layerwise casting reached trained weights: {trained_in_fp8[0]}")
    # DDP broadcasts every parameter from rank 0 as it wraps the model, and gloo has no float8 type ("Invalid
    # scalar type"). Every rank rounded the same file to float8 alike, so there is nothing to broadcast; and as
    # the frozen weights take no gradient, DDP reduces the LoRA's gradients only either way.
    from torch.nn.parallel import DistributedDataParallel

    in_fp8 = [name for name, p in transformer.named_parameters() if p.dtype == STORAGE_DTYPE]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(transformer, in_fp8)


def check_fp8_parallelism(accelerator) -> None:
    """Refuse float8 base weights under FSDP and DeepSpeed: untested on a GPU, and both change the weights'
    dtype or layout when they prepare the model (DeepSpeed casts the whole module to its half dtype, FSDP flattens
    the parameters the casting hooks convert one layer at a time). Plain data parallelism (DDP) reduces the
    gradients of the trained weights only, the LoRA's, and is tested."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        name = "FSDP" if accelerator.distributed_type == DistributedType.FSDP else "DeepSpeed"
        raise CogtuneError(f"--base-weights fp8: not supported under {name} (untested there): use DDP, or "
                           f"--base-weights bf16")
