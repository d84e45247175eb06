"""Tiny random CogVideoX models in the exact diffusers layout, for tests and the quickstart.

Each tiny model has the real release's classes, config keys and quirks (positional embeddings, temporal
patching, ofs, latent scaling, scheduler), but a few thousand parameters per component, so every stage of
cogtune runs end to end on a CPU in seconds. The VAE keeps the real 8x spatial / 4x temporal compression and
16 latent channels; the transformer keeps the real 226-token text length. What shrinks is widths and depths,
and the native size: 32x48 pixels (9 frames) stands in for 480x720 (49 frames), 48x80 for 1.5's 768x1360.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .models import NATIVE_SIZE_KEY
from .variants import VARIANTS, Variant, get_variant

TINY_TEXT_DIM = 16
TINY_NATIVE = {"1.0": (9, 32, 48), "1.5": (9, 48, 80)}
"""Native (frames, height, width) in pixels of the tiny models, per generation."""

_TOKENIZER_CORPUS = """
a an the of on in over under across through and with to from by at is are moving moves slowly quickly fast
left right up down diagonally around circle circles square squares triangle stripe ball box shape shapes
red green blue yellow white black orange purple pink cyan magenta grey gray dark light bright background
backgrounds sky grass water sand night day scene camera pans zooms still small large big tiny bounces bouncing
spinning rotating sliding falling rising video clip frame person cat dog car tree house walks runs flies
""".split()


def tiny_tokenizer():
    """A T5 (unigram) tokenizer trained offline on a small English word list: deterministic, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    trainer = trainers.UnigramTrainer(
        vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    words = sorted(set(_TOKENIZER_CORPUS))
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))] + list("abcdefghijklmnopqrstuvwxyz0123456789")
    tok.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(tok.to_str())
    # the trainer's float scores vary in the last bits between runs (threads): round them so that the same
    # seed writes the same files
    # and their order among equal scores too: keep the 3 special tokens first (ids 0-2), sort the rest
    vocab = [(piece, round(score, 4)) for piece, score in state["model"]["vocab"]]
    vocab = vocab[:3] + sorted(vocab[3:], key=lambda ps: (-ps[1], ps[0]))
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_transformer_config(v: Variant) -> dict:
    frames, height, width = TINY_NATIVE[v.generation]
    cfg = dict(
        num_attention_heads=2,
        attention_head_dim=16,  # rotary splits the head dim 2/8 + 3/8 + 3/8: a multiple of 8
        in_channels=32 if v.task == "i2v" else 16,
        out_channels=16,
        time_embed_dim=16,
        text_embed_dim=TINY_TEXT_DIM,
        num_layers=2,
        sample_height=height // 8,
        sample_width=width // 8,
        sample_frames=frames,
        patch_size=2,
        patch_size_t=v.patch_size_t,
        max_text_seq_length=v.text_length,
        use_rotary_positional_embeddings=v.positional != "sincos",
        use_learned_positional_embeddings=v.positional == "learned",
        patch_bias=v.generation == "1.0",
        ofs_embed_dim=16 if v.uses_ofs else None,  # the transformer adds it to the time embedding: same width
    )
    if v.generation == "1.5":
        # 1.5's sample size is the RoPE grid's maximum, not the training size (300x300 latents in the release), so
        # the native size is recorded beside it, where Model.native_size reads it (cogprep's default bucket)
        cfg.update(sample_height=16, sample_width=16)
        cfg[NATIVE_SIZE_KEY] = [frames, height, width]
    return cfg


def tiny_vae_config(v: Variant) -> dict:
    return dict(
        block_out_channels=(8, 8, 8, 8),  # four blocks: the real 8x spatial compression
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
        sample_height=64,
        sample_width=96,
        scaling_factor=v.vae_scaling_factor,
        invert_scale_latents=v.invert_scale_latents,
    )


def scheduler_config(v: Variant) -> dict:
    """The released scheduler config (same class and keys); only snr_shift_scale differs across variants."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="v_prediction",
        clip_sample_range=1.0,
        sample_max_value=1.0,
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        snr_shift_scale=v.snr_shift_scale,
    )


def build_tiny_pipeline(variant: str | Variant, seed: int = 0):
    """Build a tiny random pipeline of `variant` in memory (deterministic for `seed`)."""
    import diffusers
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    v = variant if isinstance(variant, Variant) else get_variant(variant)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=TINY_TEXT_DIM,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
        )
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLCogVideoX(**tiny_vae_config(v))
    torch.manual_seed(seed + 2)
    transformer = CogVideoXTransformer3DModel(**tiny_transformer_config(v))
    scheduler = getattr(diffusers, v.scheduler_class)(**scheduler_config(v))
    pipe_cls = getattr(diffusers, v.pipeline_class)
    # as from_pretrained gives them: in eval mode (T5's dropout on would make every prompt embedding random)
    for module in (text_encoder, vae, transformer):
        module.eval()
    return pipe_cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)


def make_tiny_model(variant: str | Variant, out: Path | str, seed: int = 0) -> Path:
    """Write a tiny random model of `variant` to `out` in the diffusers layout; returns `out`."""
    out = Path(out)
    pipe = build_tiny_pipeline(variant, seed)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


__all__ = ["VARIANTS", "TINY_NATIVE", "build_tiny_pipeline", "make_tiny_model", "tiny_tokenizer"]
