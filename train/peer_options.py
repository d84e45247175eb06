"""Option names users bring from other trainers, answered with cogtrain's own in one line.

People come to cogtrain from diffusers' CogVideoX examples (``examples/cogvideo/train_cogvideox_lora.py`` and
``train_cogvideox_image_to_video_lora.py``: ``--output_dir``, ``--max_train_steps``, ...), whose names click would
answer with a near spelling of ours (``--output_dir``: "Possible options: --optimizer"). Each name here gets the
option that does its job, or where its job went (stage 1, the store). Names we renamed are answered the same way.
"""

from __future__ import annotations

from ..shared.errors import CogtuneError

RENAMED = {"validation_steps": "validation_inference_steps"}
"""Our own options renamed: {old name: new name}, as Python names (config keys)."""

PEER_OPTIONS = {
    "--pretrained_model_name_or_path": "--model",
    "--output_dir": "--out",
    "--train_batch_size": "--batch-size",
    "--num_train_epochs": "--epochs",
    "--max_train_steps": "--max-steps",
    "--checkpointing_steps": "--checkpoint-every",
    "--checkpoints_total_limit": "--keep-checkpoints",
    "--resume_from_checkpoint": "--resume",
    "--adam_weight_decay": "--weight-decay",
    "--use_8bit_adam": "--optimizer adamw8bit",
    "--validation_epochs": "--validate-every (in steps)",
    "--logging_dir": "--out (tensorboard logs go to OUT/logs)",
}
"""The diffusers examples' names whose job a cogtrain option does (under another name than the examples')."""

STAGE_ONE = ("--instance_data_root", "--dataset_name", "--dataset_config_name", "--video_column", "--caption_column",
             "--id_token", "--height", "--width", "--fps", "--max_num_frames", "--skip_frames_start",
             "--skip_frames_end", "--video_reshape_mode", "--cache_dir", "--validation_prompt",
             "--validation_prompt_separator", "--num_validation_videos", "--dataloader_num_workers")
"""The examples' dataset, frame and validation-prompt options: cogprep's job, done once into the store."""


def answer(argument: str, ours: set[str]) -> str | None:
    """The one line for a command-line `argument` (``--name`` or ``--name=value``) that is not one of `ours` but
    names another trainer's option or an old one of ours; None for anything else (click answers it)."""
    name = argument.split("=", 1)[0]
    if not name.startswith("--") or name in ours:
        return None
    dashed = name.replace("_", "-")
    old = name[2:].replace("-", "_")
    if old in RENAMED:
        new = "--" + RENAMED[old].replace("_", "-")
        return f"{name} was renamed {new} (the denoising steps of each validation video; --validate-every N " \
               f"sets how often validation runs)"
    if name in PEER_OPTIONS:
        return f"cogtrain uses {PEER_OPTIONS[name]} for {name}"
    if name in STAGE_ONE:
        return (f"{name}: datasets, frames and validation prompts are cogprep's, encoded once into the store: "
                f"see cogprep encode --help, then pass cogtrain run --store STORE")
    if dashed in ours:
        return f"cogtrain uses {dashed} for {name}"
    return None


def refuse_peer_options(arguments: list[str], ours: set[str]) -> None:
    """Raise `CogtuneError` with the answer to the first argument `answer` has one for."""
    for argument in arguments:
        if argument == "--":
            return
        line = answer(argument, ours)
        if line is not None:
            raise CogtuneError(line)


def renamed_config_keys(keys: set[str]) -> str | None:
    """The one line for config file `keys` that were renamed, or None."""
    old = sorted(keys & set(RENAMED))
    if not old:
        return None
    return "; ".join(f"{key} was renamed {RENAMED[key]}" for key in old)
