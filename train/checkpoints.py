"""cogtrain's checkpoints: written atomically (a temporary folder renamed into place), the last K kept, found
again by `--resume latest|PATH`, and restored exactly: weights, optimizer and lr schedule through accelerate's
state (loaded with weights_only), the data position and every generator state through `train.state`."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils.constants import RNG_STATE_NAME

from ..shared.atomic import fsync_dir
from ..shared.disk import is_write_failure, write_error
from ..shared.errors import CogtuneError
from .config import TrainConfig
from .data import StoreLoader
from .run_lock import is_lock_file
from .state import TRAIN_STATE_JSON, TrainState, load_checkpoint_dir, rng_file_name, save_checkpoint_dir

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "step-"


def find_resume_checkpoint(config: TrainConfig) -> Path | None:
    """The checkpoint `--resume` names; None for a fresh start. A used run folder needs --resume."""
    if config.resume is None:
        if config.out.exists() and any(not is_lock_file(p) for p in config.out.iterdir()):
            raise CogtuneError(
                f"{config.out}: already holds a run: pass --resume latest to continue it, or choose another --out"
            )
        return None
    if config.resume == "latest":
        found = complete_checkpoints(config.out)
        if not found:
            log.info("--resume latest: no checkpoint in %s, starting a new run", config.out / CHECKPOINTS)
        return found[-1] if found else None
    path = Path(config.resume)
    if not (path / TRAIN_STATE_JSON).is_file():
        raise CogtuneError(f"{path}: not a cogtrain checkpoint (no {TRAIN_STATE_JSON})")
    return path


def complete_checkpoints(run: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (a half-written one is still a hidden .tmp folder)."""
    folder = Path(run) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [
        p for p in folder.iterdir()
        if p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()
        and (p / TRAIN_STATE_JSON).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


# ---------------------------------------------------------------------------------------------------------
# building the pieces


def checkpoint_keys(model: torch.nn.Module, mode: str) -> set[str]:
    """What a checkpoint holds of the model: the LoRA weights only (the frozen rest is the model's), or all."""
    if mode == "lora":
        return {name for name, p in model.named_parameters() if p.requires_grad}
    return set(model.state_dict())


def checkpoint_shapes(model: torch.nn.Module, mode: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} of what a checkpoint of `model` holds."""
    keys = checkpoint_keys(model, mode)
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name in keys}


def register_lora_checkpoint_hook(accelerator, mode: str) -> None:
    """Make accelerate's save_state write only the trained weights for LoRA (megabytes, not the 10 GB base)."""
    if mode != "lora":
        return

    def keep_trained(models, weights, output_dir) -> None:
        for model, state in zip(models, weights):
            keep = checkpoint_keys(model, mode)
            for key in [k for k in state if k not in keep]:
                del state[key]

    accelerator.register_save_state_pre_hook(keep_trained)


def save_checkpoint(accelerator, run: Path, step: int, position: dict[str, Any], keep: int,
                    protect: int | None = None) -> Path:
    """Write ``checkpoints/step-XXXXXX`` atomically: into ``.step-XXXXXX.tmp``, then one rename (rank 0).

    The last `keep` checkpoints are kept (0: all), and the one of step `protect` (the best held-out loss)."""
    final = Path(run) / CHECKPOINTS / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        # the generators travel in train_state's safetensors (see train.state): drop accelerate's pickled copy,
        # so that a checkpoint holds nothing that loading would unpickle
        for pickled in tmp.glob(f"{RNG_STATE_NAME}_*.pkl"):
            pickled.unlink(missing_ok=True)
        state = TrainState(step=step, sampler=position, extra={"processes": accelerator.num_processes})
        save_checkpoint_dir(tmp, state, rank=accelerator.process_index)
    except Exception as e:
        if not is_write_failure(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint is never left on the full disk
        last = complete_checkpoints(run)
        kept = f"the last checkpoint, {last[-1].name}, is intact" if last else "no earlier checkpoint"
        raise write_error(tmp, e, f"the checkpoint of step {step}",
                          f"free space, then continue with --resume latest ({kept})") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replaced = final.with_name(f".{final.name}.old")
        if final.exists():  # the same step saved by an earlier attempt of this run
            os.replace(final, replaced)
        os.replace(tmp, final)
        shutil.rmtree(replaced, ignore_errors=True)
        fsync_dir(final.parent)
        log.debug("checkpoint of step %d written: %s", step, final)
        if keep > 0:
            kept = f"{CHECKPOINT_PREFIX}{protect:06d}" if protect is not None else None
            for old in complete_checkpoints(run)[:-keep]:
                if old.name != kept:
                    shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator, model: torch.nn.Module, lr_scheduler, loader: StoreLoader, checkpoint: Path, mode: str,
           seed: int) -> int:
    """Restore model, optimizer, lr schedule, data position and generators; returns the step to continue after.

    On another number of processes than the checkpoint's (elastic resume) the weights, optimizer, lr and the
    epoch's remaining samples carry over exactly; the global generators of ranks the checkpoint did not have
    start from (seed, rank, step), so LoRA dropout draws differ from an uninterrupted run's.
    """
    weights = checkpoint / "model.safetensors"
    if weights.exists():
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        # accelerate saves the unwrapped model's names (no DDP "module." prefix)
        if saved != checkpoint_shapes(accelerator.unwrap_model(model), mode):
            raise CogtuneError(
                f"{checkpoint}: its weights do not fit this run (another --mode, --rank, --target-modules or "
                f"number of processes): resume with the settings it was made with"
            )
    from accelerate.utils import DistributedType

    # a LoRA checkpoint holds the adapter only (see register_lora_checkpoint_hook); DeepSpeed loads its own way
    strict = {} if accelerator.distributed_type == DistributedType.DEEPSPEED else {"strict": mode == "sft"}
    # weights_only: the optimizer, lr schedule and RNG files are torch.save'd; load them without unpickling code
    accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True}, **strict)
    state = load_checkpoint_dir(checkpoint, rank=accelerator.process_index)
    loader.load_state_dict(state.sampler)
    # the sampler's world is the data-parallel degree (the processes over --sp-degree); the lr schedule's the
    # processes. Checkpoints from before --sp-degree have one process per data-parallel rank.
    world = loader.sampler.world_size
    saved_world = int(state.sampler.get("world_size", world))
    processes, saved_processes = accelerator.num_processes, int(state.extra.get("processes", saved_world))
    if state.rng is not None and saved_world == world:
        state.rng.restore()
    elif saved_world == world and saved_processes == processes:
        raise CogtuneError(f"{checkpoint / rng_file_name(accelerator.process_index)}: missing (checkpoint damaged)")
    else:
        from accelerate.utils import set_seed

        set_seed(int(np.random.SeedSequence([seed, accelerator.process_index, state.step]).generate_state(1)[0]))
    if saved_processes != processes:
        # accelerate steps the schedule once per process per optimizer step: re-count it for this world
        lr_scheduler.scheduler.last_epoch = state.step * processes - 1
        lr_scheduler.scheduler.step()
    return state.step


# ---------------------------------------------------------------------------------------------------------
# the run
