"""What a training run leaves behind for its users: LoRA weights, a full transformer, and a model card.

Every output loads straight into the diffusers pipelines, the real client of a trained model:

    RUN_DIR/
      pytorch_lora_weights.safetensors   LoRA: ``pipe.load_lora_weights(RUN_DIR)``, rank and alpha in the metadata
      transformer/                       full fine-tune: ``CogVideoXTransformer3DModel.from_pretrained(RUN_DIR,
                                         subfolder="transformer")``
      README.md                          model card: how to load it, and the settings it was trained with

Each file or folder is written under a temporary name beside its final one and renamed into place, so a run
killed while saving leaves the previous output whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from ..shared.atomic import atomic_write_text, fsync_dir
from ..shared.models import is_hub_id
from ..shared.variants import Variant, get_variant

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""The file name `load_lora_weights` looks for in a folder (diffusers' ``LORA_WEIGHT_NAME_SAFE``)."""
TRANSFORMER_FOLDER = "transformer"
ADAPTER_NAME = "cogtune"
"""The adapter name the model card's snippet loads the LoRA under."""
LORA_METADATA_ALWAYS = ("r", "lora_alpha", "target_modules")
"""LoraConfig fields written to the LoRA file's metadata even at their default values."""

_UMASK = os.umask(0)
os.umask(_UMASK)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP, FSDP, DeepSpeed and ``torch.compile`` wrappers: accelerate's own unwrapping
    (what ``Accelerator.unwrap_model`` runs), for callers that hold a model but no accelerator."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


# ---------------------------------------------------------------------------------------------------------
# LoRA


def save_lora(
    transformer: torch.nn.Module, out_dir: Path, *, rank: int, alpha: float, target_modules: list[str],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the transformer's LoRA adapter to ``out_dir/pytorch_lora_weights.safetensors``; returns the file.

    Written by diffusers' own ``save_lora_weights`` (keys ``transformer.<module>.lora_A.weight`` /
    ``lora_B.weight``), with the adapter's LoraConfig in the file's metadata, so ``load_lora_weights`` rebuilds
    the adapter with the trained alpha instead of assuming alpha = rank (the wrong strength every peer ships).
    Weights are saved as float32: they are the exact trained values whatever the training dtype, and
    ``load_lora_weights`` casts them to the dtype of the pipeline they are loaded into.

    `rank`, `alpha` and `target_modules` are what the caller trained with; they must match the adapter on
    the model (whose config is what gets written), else ValueError. `state_dict`: the model's whole state
    gathered from its shards (``accelerator.get_state_dict`` under FSDP or ZeRO-3), where the model's own
    parameters are only this rank's shard.
    """
    from diffusers import CogVideoXPipeline
    from peft.utils import get_peft_model_state_dict

    model = unwrap_model(transformer)
    adapter_name, config = _only_adapter(model)
    trained = (config.r, config.lora_alpha, set(config.target_modules))
    if trained != (rank, alpha, set(target_modules)):
        raise ValueError(
            f"the model's LoRA adapter has rank {config.r}, alpha {config.lora_alpha}, targets "
            f"{sorted(config.target_modules)}; save_lora was told rank {rank}, alpha {alpha}, "
            f"targets {sorted(target_modules)}"
        )
    weights = {
        name: tensor.detach().to("cpu", torch.float32).contiguous()
        for name, tensor in get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter_name).items()
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / LORA_WEIGHT_NAME
    staging = Path(tempfile.mkdtemp(prefix=f".{LORA_WEIGHT_NAME}.", dir=out_dir))
    try:
        # save_lora_weights is a classmethod of CogVideoXLoraLoaderMixin: the same for the T2V and I2V pipelines
        CogVideoXPipeline.save_lora_weights(
            staging,
            transformer_lora_layers=weights,
            transformer_lora_adapter_metadata=lora_metadata(config),
        )
        _finish_file(staging / LORA_WEIGHT_NAME)
        os.replace(staging / LORA_WEIGHT_NAME, final)
        fsync_dir(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def lora_metadata(config: Any) -> dict[str, Any]:
    """The LoraConfig as a JSON-ready dict of its rank, alpha, targets and every field not at its default.

    ``load_lora_weights`` rebuilds the adapter with ``LoraConfig(**metadata)``, and a peft older than ours
    refuses fields it does not know, which a full ``to_dict()`` of a recent peft is full of. Leaving out the
    defaults keeps the file loadable there and changes nothing: the loader's peft fills them in again.
    """
    from peft import LoraConfig

    defaults = LoraConfig().to_dict()
    out = {}
    for key, value in config.to_dict().items():
        if key in LORA_METADATA_ALWAYS or value != defaults.get(key):
            out[key] = sorted(value) if isinstance(value, set) else value
    return out


def _only_adapter(model: torch.nn.Module) -> tuple[str, Any]:
    """(name, LoraConfig) of the model's one peft adapter."""
    adapters = dict(getattr(model, "peft_config", None) or {})
    if len(adapters) != 1:
        raise ValueError(f"save_lora needs a model with exactly one LoRA adapter, found {sorted(adapters) or 'none'}")
    return next(iter(adapters.items()))


# ---------------------------------------------------------------------------------------------------------
# full fine-tune


def save_full(transformer: torch.nn.Module, out_dir: Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the whole transformer as a diffusers ``transformer/`` folder (safetensors) in `out_dir`; returns it.

    The folder loads with ``CogVideoXTransformer3DModel.from_pretrained(out_dir / "transformer")`` and plugs into
    ``pipeline_class.from_pretrained(base, transformer=...)``. Weights keep the model's dtype. The folder is
    written under a temporary name and swapped in whole; a previous ``transformer/`` is replaced.
    `state_dict`: the weights gathered from the shards (FSDP, ZeRO-3), put into an unsharded copy of the
    model built without memory of its own (meta device) and saved from there.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / TRANSFORMER_FOLDER
    staging = Path(tempfile.mkdtemp(prefix=f".{TRANSFORMER_FOLDER}.", dir=out_dir))
    try:
        os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes an owner-only folder; the final one gets the usual mode
        model = unwrap_model(transformer)
        if state_dict is not None:
            model = _unsharded_copy(model, state_dict)
        model.save_pretrained(staging, safe_serialization=True)
        for file in staging.iterdir():
            _finish_file(file)
        _replace_folder(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _unsharded_copy(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A new model of `model`'s class and config holding `state_dict`'s tensors (no copy, no random init)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        unsharded = type(model).from_config(model.config)
    unsharded.load_state_dict(state_dict, strict=True, assign=True)
    return unsharded


def _replace_folder(new: Path, final: Path) -> None:
    """Rename `new` to `final`; a folder already at `final` is moved aside first and deleted after.

    A rename cannot replace a non-empty folder, so there is an instant with no `final`, but never a half one.
    """
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(new, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# model card


def write_model_card(
    out_dir: Path, config: Mapping[str, Any], base_model: str, variant: Variant | str, mode: str,
    clip_fps: float | None = None, pictures: list[Path] = (), size: tuple[int, int, int] | None = None,
) -> Path:
    """Write ``out_dir/README.md``: hub front matter, a copy-paste snippet that loads the output, the settings table.

    `config` is the run's settings (nested dicts become dotted names), `base_model` the model trained from
    (hub id or folder), `mode` ``lora`` or ``full``, `clip_fps` the frame rate cogprep sampled the clips at (None:
    each source's own), which sets the speed of the motion the weights learned; `pictures` (paths relative to
    `out_dir`: the loss plot, the last validation sheet) are shown under it. `size` (frames, height, width) is
    what the snippet renders at: the size the run trained at (default: the model's native size).
    """
    if mode not in ("lora", "full"):
        raise ValueError(f"mode must be 'lora' or 'full', got {mode!r}")
    variant = variant if isinstance(variant, Variant) else get_variant(variant)
    out_dir = Path(out_dir)
    kind = "LoRA" if mode == "lora" else "full fine-tune"
    text = "\n".join(
        [
            "---",
            yaml.safe_dump(_front_matter(base_model, variant, mode), sort_keys=False).rstrip(),
            "---",
            "",
            f"# {variant.name} {kind}",
            "",
            f"Fine-tuned from `{base_model}` ({variant.name}, {_task_words(variant)}) with cogtune.",
            "",
            _frame_rate_sentence(clip_fps, variant),
            "",
            *_base_weights_paragraph(config),
            *(f"![{picture.stem}]({picture.as_posix()})\n" for picture in pictures),
            "## Use it",
            "",
            "```python",
            _load_snippet(out_dir, base_model, variant, mode, size),
            "```",
            "",
            "## Training settings",
            "",
            "| setting | value |",
            "|---|---|",
            *(f"| {_cell(name)} | {_cell(value)} |" for name, value in _flatten(config)),
            "",
        ]
    )
    path = out_dir / "README.md"
    atomic_write_text(path, text)
    return path


def _frame_rate_sentence(clip_fps: float | None, variant: Variant) -> str:
    if clip_fps is None:
        return (f"Trained on clips at each source video's own frame rate; the pipeline's videos play at "
                f"{variant.fps} fps, so motion may look faster or slower than in the clips.")
    own = " (the model's own rate)" if clip_fps == variant.fps else ""
    return (f"Trained on clips sampled at {clip_fps:g} fps{own}; export generated videos at {clip_fps:g} fps to see "
            f"motion at the speed it was trained at.")


def _base_weights_paragraph(config: Mapping[str, Any]) -> list[str]:
    """A sentence for a LoRA trained on a float8 base (--base-weights fp8), which users load on a bf16 one."""
    if config.get("base_weights") != "fp8":
        return []
    compute = {"no": "float32", "fp16": "float16"}.get(config.get("mixed_precision"), "bfloat16")
    return [f"The base model's frozen transformer weights were stored in float8 (e4m3) while this LoRA trained, "
            f"each layer upcast to {compute} for its computation (patch and time embeddings, norms and the output "
            f"projection kept in {compute}): the LoRA learned against that rounded base. It loads on the ordinary "
            f"bf16 or float32 pipeline as any LoRA does.", ""]


def _front_matter(base_model: str, variant: Variant, mode: str) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    # The hub reads base_model as a repo id: a local folder would be a broken link there.
    if is_hub_id(base_model):
        meta["base_model"] = base_model
        meta["base_model_relation"] = "adapter" if mode == "lora" else "finetune"
    meta["library_name"] = "diffusers"
    meta["pipeline_tag"] = _task_words(variant)
    meta["tags"] = ["cogvideox", _task_words(variant), "lora" if mode == "lora" else "full-fine-tune", "cogtune"]
    return meta


def _task_words(variant: Variant) -> str:
    return "image-to-video" if variant.task == "i2v" else "text-to-video"


def _load_snippet(out_dir: Path, base_model: str, variant: Variant, mode: str,
                  size: tuple[int, int, int] | None) -> str:
    """Python that loads the base pipeline with this run's output and renders one video at `size` (frames,
    height, width; default the native size)."""
    frames, height, width = size or (variant.native_frames, variant.native_height, variant.native_width)
    pipeline = variant.pipeline_class
    dtype = f"torch.{variant.dtype}"
    imports = [pipeline] + (["CogVideoXTransformer3DModel"] if mode == "full" else [])
    lines = [
        "import torch",
        f"from diffusers import {', '.join(imports)}",
        "from diffusers.utils import export_to_video" + (", load_image" if variant.task == "i2v" else ""),
        "",
        f"RUN_DIR = {str(out_dir.resolve())!r}  # this folder, or the hub repo it was uploaded to",
    ]
    if mode == "lora":
        lines += [
            f"pipe = {pipeline}.from_pretrained({base_model!r}, torch_dtype={dtype})",
            f'pipe.load_lora_weights(RUN_DIR, adapter_name="{ADAPTER_NAME}")  # rank and alpha come from the file',
            f'pipe.set_adapters(["{ADAPTER_NAME}"], [1.0])  # the LoRA strength: lower it to weaken the effect',
        ]
    else:
        lines += [
            "transformer = CogVideoXTransformer3DModel.from_pretrained(",
            f'    RUN_DIR, subfolder="transformer", torch_dtype={dtype}',
            ")",
            f"pipe = {pipeline}.from_pretrained({base_model!r}, transformer=transformer, torch_dtype={dtype})",
        ]
    lines += [
        "pipe.enable_model_cpu_offload()  # or pipe.to(\"cuda\") with enough GPU memory",
        "pipe.vae.enable_tiling()",
        "",
    ]
    image_arg = ""
    if variant.task == "i2v":
        lines.append('image = load_image("first_frame.png")')
        image_arg = "image=image, "
    lines += [
        "video = pipe(",
        f'    {image_arg}prompt="your prompt",',
        f"    num_frames={frames}, height={height}, width={width},  # the size it trained at",
        "    guidance_scale=6.0, num_inference_steps=50,",
        ").frames[0]",
        f'export_to_video(video, "output.mp4", fps={variant.fps})',
    ]
    return "\n".join(lines)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, value) for every leaf of a nested settings dict, in order."""
    rows: list[tuple[str, Any]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _flatten(value, f"{name}.")
        else:
            rows.append((name, value))
    return rows


def _cell(value: Any) -> str:
    """A value as one markdown table cell: strings as they are, None as ``none``, the rest as JSON; pipes
    escaped."""
    text = value if isinstance(value, str) else "none" if value is None else json.dumps(value, default=str)
    return text.replace("\n", " ").replace("|", "\\|")


# ---------------------------------------------------------------------------------------------------------
# durability


def _finish_file(path: Path) -> None:
    """Give a written file the usual mode (safetensors creates owner-only files) and flush it to disk."""
    os.chmod(path, 0o666 & ~_UMASK)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
