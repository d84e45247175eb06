"""Held-out loss: a figure that moves only when the weights do.

The training loss of a diffusion model jumps with each step's timestep and noise, so it cannot tell a good
checkpoint from an overfitted one. `--eval-holdout K` keeps K samples of the store out of training, chosen from
their keys (the same store and K always give the same set); `--eval-every N` computes their v-prediction loss at
fixed timesteps (`EVAL_TIMESTEPS`, spread over the schedule) with posterior and noise draws fixed per (sample,
timestep), one cached noise-augmented image per sample for I2V, and no caption or image dropout. Each rank evaluates
its share with batch size 1; the per-sample losses are gathered and summed in sample order, so the same weights
give the same figure in any run, resumed or not, on any number of processes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..shared import store as S
from ..shared.errors import CogtuneError
from .data import PlannedBatch, SamplerPosition, StoreDataset
from .math import TrainBatch, training_step

EVAL_TIMESTEPS = 8
"""Timesteps each held-out sample is evaluated at: the centres of 8 equal slices of the schedule."""
_EVAL_STREAM = 3  # a random stream of its own, apart from the sampler's (see train.data)


def holdout_rows(store, holdout: float | None) -> list[int]:
    """The index rows of the held-out set: `holdout` samples (a count, or a fraction of the store when below 1),
    the first by sha256 of their keys, so that the set depends on the store's content only."""
    if not holdout:
        return []
    keys = S.IndexColumns(store, ("key",)).strings("key")
    count = round(holdout * len(keys)) if holdout < 1 else int(holdout)
    if not 0 < count < len(keys):
        raise CogtuneError(f"--eval-holdout {holdout:g}: the store has {len(keys)} samples; hold out at least one and "
                           f"leave at least one to train on")
    order = sorted(range(len(keys)), key=lambda row: hashlib.sha256(keys[row].encode()).hexdigest())
    return sorted(order[:count])


def eval_generator(seed: int, row: int, index: int, device: torch.device) -> torch.Generator:
    """The generator of held-out sample `row`'s draws at its `index`-th timestep: the same in every run."""
    words = np.random.SeedSequence([seed, _EVAL_STREAM, row, index]).generate_state(2)
    return torch.Generator(device).manual_seed(int(words[0]) << 31 | int(words[1]) >> 1)


def eval_timesteps(num_train_timesteps: int, count: int = EVAL_TIMESTEPS) -> list[int]:
    return [int((i + 0.5) * num_train_timesteps / count) for i in range(count)]


@dataclass
class Evaluator:
    """Computes the held-out loss of the weights as they are (see the module doc)."""

    dataset: StoreDataset
    rows: list[int]
    """The held-out index rows, in order."""
    seed: int

    def evaluate(self, stepper, accelerator) -> dict[str, float]:
        """{"eval_loss": mean over samples and timesteps, "eval_loss_t{t}": mean over samples at t}, on every rank."""
        model = accelerator.unwrap_model(stepper.model)  # no DDP: ranks evaluate different counts, no collective
        timesteps = eval_timesteps(stepper.noise_scheduler.config.num_train_timesteps)
        rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
        share = -(-len(self.rows) // world)
        mine = torch.full((share, len(timesteps)), math.nan, device=device)
        was_training = model.training
        model.eval()  # LoRA dropout off: a draw of it would make the figure move without the weights
        try:
            with torch.no_grad():
                for slot, row in enumerate(self.rows[rank::world]):
                    batch = self._batch(row, device, stepper.embed_dtype)
                    for i, t in enumerate(timesteps):
                        generator = eval_generator(self.seed, row, i, device)
                        mine[slot, i] = training_step(
                            model, stepper.noise_scheduler, batch, generator=generator,
                            vae_scaling_factor=stepper.vae_config["scaling_factor"],
                            invert_scale_latents=bool(stepper.vae_config.get("invert_scale_latents", False)),
                            transformer_config=stepper.transformer_config,
                            timesteps=torch.tensor([t]),
                        )
        finally:
            model.train(was_training)
        # rank r's slot s is held-out sample s * world + r: put them back in order, then sum in that order
        gathered = accelerator.gather(mine[None]).reshape(world, share, -1).transpose(0, 1).reshape(-1, len(timesteps))
        losses = gathered[: len(self.rows)].double().cpu()
        metrics = {"eval_loss": losses.mean().item()}
        metrics.update({f"eval_loss_t{t}": losses[:, i].mean().item() for i, t in enumerate(timesteps)})
        return metrics

    def _batch(self, row: int, device: torch.device, embed_dtype: torch.dtype) -> TrainBatch:
        planned = PlannedBatch(rows=[row], epoch=0, global_index=0, after=SamplerPosition(0, 0))
        tensors = self.dataset.read_batch(planned)  # I2V: the noise-augmented image a fixed `planned` draws
        image = tensors[S.NOISY].to(device) if S.NOISY in tensors else None
        return TrainBatch(latent_mean=tensors[S.MEAN].to(device), latent_logvar=tensors[S.LOGVAR].to(device),
                          prompt_embeds=tensors[S.EMBEDDING].to(device, embed_dtype), image_latents=image)
