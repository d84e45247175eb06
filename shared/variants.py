"""The five CogVideoX variants and their quirks, in one table, and detection from a model's configs.

Every place in cogtune that behaves differently per variant reads a field of `Variant` instead of
testing the variant's name. The variant is detected from the configs of the model folder (never from
its name), and a config that matches no known variant, or contradicts itself, is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .errors import CogtuneError

Task = Literal["t2v", "i2v"]
Positional = Literal["sincos", "rotary", "learned"]


@dataclass(frozen=True)
class Variant:
    """One released CogVideoX model family member and everything that sets it apart."""

    name: str
    """Release name, e.g. ``CogVideoX-5b``."""
    slug: str
    """Short name used on the command line (``--variant 5b``)."""
    task: Task
    """``t2v``: text-to-video; ``i2v``: the transformer also takes an image latent on the channels."""
    generation: Literal["1.0", "1.5"]
    positional: Positional
    """sincos: fixed 3D sin-cos table (2b); rotary: 3D RoPE computed per shape; learned: RoPE plus a learned
    table that only exists for the native size (5b-I2V)."""
    patch_size_t: int | None
    """Temporal patch size: None for 1.0, 2 for 1.5 (so the latent frame count must be even)."""
    uses_ofs: bool
    """1.5-I2V embeds an ``ofs`` scalar; the pipeline passes 2.0, so must training."""
    invert_scale_latents: bool
    """How the pipeline scales the I2V image latent: ``* scaling_factor`` (False) or ``/ scaling_factor`` (True)."""
    vae_scaling_factor: float
    text_length: int
    """T5 tokens the transformer takes (``max_text_seq_length``)."""
    native_frames: int
    native_height: int
    native_width: int
    fps: int
    """Frame rate of the released model's training data and outputs."""
    dtype: Literal["float16", "bfloat16"]
    """Dtype of the released checkpoint."""
    pipeline_class: str
    """The diffusers pipeline that runs it: the oracle for the training math."""
    scheduler_class: str
    snr_shift_scale: float

    @property
    def fixed_size(self) -> bool:
        """True where only the native frames x height x width works (learned positional embeddings)."""
        return self.positional == "learned"

    @property
    def rotary(self) -> bool:
        """True where the transformer takes 3D rotary embeddings (every variant but 2b; 5b-I2V beside its table)."""
        return self.positional in ("rotary", "learned")


# fmt: off
VARIANTS: dict[str, Variant] = {v.slug: v for v in [
    #       name                  slug          task   gen    positional patch_t ofs    invert scale        text fr  H    W     fps dtype       pipeline                         scheduler                snr
    Variant("CogVideoX-2b",       "2b",         "t2v", "1.0", "sincos",  None,   False, False, 1.15258426, 226, 49, 480, 720,  8, "float16",  "CogVideoXPipeline",             "CogVideoXDDIMScheduler", 3.0),
    Variant("CogVideoX-5b",       "5b",         "t2v", "1.0", "rotary",  None,   False, False, 0.7,        226, 49, 480, 720,  8, "bfloat16", "CogVideoXPipeline",             "CogVideoXDDIMScheduler", 1.0),
    Variant("CogVideoX-5b-I2V",   "5b-i2v",     "i2v", "1.0", "learned", None,   False, False, 0.7,        226, 49, 480, 720,  8, "bfloat16", "CogVideoXImageToVideoPipeline", "CogVideoXDDIMScheduler", 1.0),
    Variant("CogVideoX1.5-5B",    "1.5-5b",     "t2v", "1.5", "rotary",  2,      False, True,  0.7,        226, 81, 768, 1360, 16, "bfloat16", "CogVideoXPipeline",             "CogVideoXDDIMScheduler", 1.0),
    Variant("CogVideoX1.5-5B-I2V", "1.5-5b-i2v", "i2v", "1.5", "rotary",  2,      True,  True,  0.7,        226, 81, 768, 1360, 16, "bfloat16", "CogVideoXImageToVideoPipeline", "CogVideoXDDIMScheduler", 1.0),
]}
# fmt: on

PIPELINE_TASK = {"CogVideoXPipeline": "t2v", "CogVideoXImageToVideoPipeline": "i2v"}


def get_variant(slug_or_name: str) -> Variant:
    """Look a variant up by slug (``5b-i2v``) or release name (``CogVideoX-5b-I2V``), case-insensitively."""
    key = slug_or_name.lower()
    for v in VARIANTS.values():
        if key in (v.slug, v.name.lower()):
            return v
    raise CogtuneError(f"unknown variant {slug_or_name!r}; known: {', '.join(VARIANTS)}")


def detect_variant(
    transformer_config: dict[str, Any],
    vae_config: dict[str, Any] | None = None,
    pipeline_class: str | None = None,
    where: str = "model",
) -> Variant:
    """Name the variant a model is, from its transformer config (plus VAE config and pipeline class when given).

    Raises `CogtuneError` naming `where` and the contradiction when the configs match no variant.
    """
    tc = transformer_config
    in_ch = tc.get("in_channels", 16)
    out_ch = tc.get("out_channels", 16) or 16
    if in_ch == out_ch:
        task: Task = "t2v"
    elif in_ch == 2 * out_ch:
        task = "i2v"
    else:
        raise CogtuneError(
            f"{where}: transformer in_channels {in_ch} is neither out_channels {out_ch} (text-to-video) "
            f"nor twice it (image-to-video)"
        )
    if pipeline_class is not None:
        if pipeline_class not in PIPELINE_TASK:
            raise CogtuneError(f"{where}: model_index.json names {pipeline_class!r}, not a CogVideoX pipeline")
        if PIPELINE_TASK[pipeline_class] != task:
            kind = "image-to-video" if task == "i2v" else "text-to-video"
            raise CogtuneError(
                f"{where}: transformer in_channels {in_ch} means {kind}, but model_index.json names {pipeline_class}"
            )
    generation = "1.0" if tc.get("patch_size_t") is None else "1.5"
    rotary = bool(tc.get("use_rotary_positional_embeddings", False))
    learned = bool(tc.get("use_learned_positional_embeddings", False))
    positional: Positional = "learned" if learned else ("rotary" if rotary else "sincos")
    uses_ofs = tc.get("ofs_embed_dim") is not None
    found = (task, generation, positional, uses_ofs, tc.get("patch_size_t"))
    for v in VARIANTS.values():
        if (v.task, v.generation, v.positional, v.uses_ofs, v.patch_size_t) == found:
            break
    else:
        raise CogtuneError(
            f"{where}: transformer config matches no CogVideoX variant (task {task}, generation {generation}, "
            f"{positional} positions, ofs {'set' if uses_ofs else 'unset'}, patch_size_t {tc.get('patch_size_t')}); "
            f"known: {', '.join(x.name for x in VARIANTS.values())}"
        )
    if learned and not rotary:
        raise CogtuneError(f"{where}: learned positional embeddings without rotary ones exist in no CogVideoX release")
    if vae_config is not None:
        invert = bool(vae_config.get("invert_scale_latents", False))
        if invert != v.invert_scale_latents:
            raise CogtuneError(
                f"{where}: vae invert_scale_latents is {str(invert).lower()}, but {v.name} (generation "
                f"{v.generation}) needs {str(v.invert_scale_latents).lower()}"
            )
        latent = vae_config.get("latent_channels", 16)
        if latent != out_ch:
            raise CogtuneError(f"{where}: vae latent_channels {latent} differs from transformer out_channels {out_ch}")
    return v
