"""cogtrain's run: the accelerate training loop and its outputs (start-up checks: `train.checks`; checkpoints and
exact resume: `train.checkpoints`).

A run folder (``--out``) holds::

    RUN/
      config.yaml                      the resolved config: ``--config RUN/config.yaml`` repeats the run
      losses.jsonl                     one line per optimizer step: step, epoch and the logged metrics (rank 0)
      samples/rank-R.jsonl             with --log-samples: the index rows each step trained, per rank
      checkpoints/step-000500/         accelerate state (model, optimizer, lr schedule, RNG) + train_state.json
      logs/                            tensorboard (or nothing, with wandb / none)
      validation/                      validation videos
      pytorch_lora_weights.safetensors (LoRA) or transformer/ (sft), README.md model card
      summary.json                     steps per rank, a digest of each rank's trained weights, time, final loss

Every refusal (another model's store, a stale dataset, a size the model cannot train at, a missing optional
package, a run folder already in use) happens before anything is written in RUN. Only cached tensors are read:
the T5 encoder is never loaded, the VAE only by validation.

Resume is exact: the weights, optimizer and lr schedule come back from accelerate's state, the data position and
every generator state from `train.state`, and each step draws its noise from a generator seeded by
(seed, data-parallel rank, step), so an interrupted run resumed from a checkpoint takes the same steps as one never
stopped. The ranks of one sequence-parallel group (`train.sequence_parallel`) share a data-parallel rank: they read
the same batch and draw the same noise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..shared import store as S
from ..shared.atomic import atomic_write_text
from ..shared.errors import CogtuneError
from ..shared.log import MAIN_ONLY
from ..shared.models import Model
from ..shared.provenance import software_versions
from .checkpoints import CHECKPOINTS, complete_checkpoints, register_lora_checkpoint_hook, resume, save_checkpoint
from .checks import RunInputs, check_run, check_run_paths, confirm_dataset_current
from .config import TrainConfig
from .data import BucketBatchSampler, StoreDataset, StoreLoader
from .evaluation import Evaluator, holdout_rows
from .math import TrainBatch, drop_captions, drop_images, training_step
from .optimizer_sharding import OptimizerSharding
from .plots import PLOT, write_loss_plot
from .preemption import Preempted, StopSignals
from .progress import RunProgress, start_banner, wants_bar
from .run_lock import hold_run_folder
from .sequence_parallel import SequenceParallel
from .state import RngStates
from .validation import most_common_bucket

log = logging.getLogger(__name__)

LOSSES = "losses.jsonl"
SAMPLES = "samples"
SUMMARY = "summary.json"
LOGS = "logs"
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""Dtype of the frozen weights per --mixed-precision (trained weights are always float32)."""
OUTPUT_KIND = {"lora": "lora", "sft": "full"}
"""What train.outputs calls each --mode's output."""
CUDA_ALLOCATOR = "expandable_segments:True"
"""PyTorch's CUDA allocator settings for a run, unless PYTORCH_CUDA_ALLOC_CONF is set: segments that grow in
place, so that activations of changing sizes (buckets, the recompute of each block) do not strand reserved
memory in blocks of the wrong size."""


@dataclass
class TrainResult:
    """What a run did, as the process that ran it saw it."""

    run: Path
    """The run folder."""
    steps: int
    """Optimizer steps done in total (resumed ones included)."""
    losses: list[float] = field(default_factory=list)
    """Loss of each step this invocation trained, averaged over ranks and accumulated batches."""
    outputs: list[Path] = field(default_factory=list)
    """Trained weights and model card (rank 0; empty on other ranks)."""
    seconds: float = 0.0
    """Wall time of this invocation."""


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        # DDP's gradients as views of its all-reduce buckets: without, it keeps the buckets besides the gradients,
        # a second copy of every trained weight's gradient for the whole run (torch's DistributedDataParallel
        # docstring); the same all-reduce on the same values either way
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(config.out), logging_dir=str(config.out / LOGS)),
        # accelerate sets up data parallelism on CPU (gloo) only when told to use the CPU
        cpu=config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()),
    )


def release_accelerator(accelerator) -> None:
    """Stop trackers and the process group, and forget accelerate's process-wide state, so that another run
    in this process (tests, notebooks) starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    accelerator.end_training()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def build_transformer(config: TrainConfig, model: Model) -> torch.nn.Module:
    """The transformer to train: LoRA on frozen weights, or every weight (sft); trained weights float32."""
    if config.mode == "sft":
        transformer = model.load_transformer(torch.float32)
    else:
        from peft import LoraConfig

        transformer = model.load_transformer(WEIGHT_DTYPES[config.mixed_precision])
        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.lora_dropout,
                                           target_modules=config.target_modules, init_lora_weights=True))
        # autocast computes in half precision, but the optimizer must update float32 weights
        for parameter in transformer.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
        if config.base_weights == "fp8":
            from .base_weights import store_frozen_weights_in_fp8

            store_frozen_weights_in_fp8(transformer, WEIGHT_DTYPES[config.mixed_precision])
    if config.gradient_checkpointing:
        from .activation_offload import offloaded_checkpoint

        transformer.enable_gradient_checkpointing(offloaded_checkpoint if config.offload_checkpoints else None)
    transformer.train()
    return transformer


def make_optimizer(config: TrainConfig, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)


def make_loader(config: TrainConfig, rank: int, world_size: int, held_out: list[int]) -> StoreLoader:
    """The store's batches for this rank, the `held_out` rows left out; --batch-size replaces every bucket's
    batch size from the store."""
    if config.batch_size is None:
        return StoreLoader.from_store(config.store, 1, seed=config.seed, rank=rank, world_size=world_size,
                                      prefetch=config.prefetch, on_damaged=config.on_damaged, held_out=held_out)
    dataset = StoreDataset(config.store, seed=config.seed, on_damaged=config.on_damaged, held_out=held_out)
    sampler = BucketBatchSampler(dataset.training_row_buckets, config.batch_size, seed=config.seed, rank=rank,
                                 world_size=world_size)
    return StoreLoader(dataset, sampler, prefetch=config.prefetch)


def total_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: --max-steps, else --epochs passes over the store."""
    if config.max_steps is not None:
        return config.max_steps
    return config.epochs * math.ceil(batches_per_epoch / config.gradient_accumulation_steps)


def step_generator(seed: int, rank: int, batch_number: int, device: torch.device) -> torch.Generator:
    """The generator of one batch's draws, from (seed, data-parallel rank, batch): a resumed run draws the same
    noise, and every rank of a sequence-parallel group the same."""
    words = np.random.SeedSequence([seed, rank, batch_number]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(words[0]) << 31 | int(words[1]) >> 1)


def to_train_batch(batch: dict[str, torch.Tensor], device: torch.device, embed_dtype: torch.dtype) -> TrainBatch:
    return TrainBatch(
        latent_mean=batch[S.MEAN].to(device),
        latent_logvar=batch[S.LOGVAR].to(device),
        prompt_embeds=batch[S.EMBEDDING].to(device, embed_dtype),
        image_latents=batch[S.NOISY].to(device) if S.NOISY in batch else None,
    )


# ---------------------------------------------------------------------------------------------------------
# the run


def use_cuda_allocator_defaults() -> None:
    """Set `CUDA_ALLOCATOR` unless the user chose settings; PyTorch reads them when CUDA first allocates."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOCATOR)


def import_peft() -> None:
    """peft and diffusers' hooks (which import it), and peft's answer whether bitsandbytes is installed, which it
    keeps for the process: the CLI calls this inside `shared.cli.bitsandbytes_hidden` unless 8-bit AdamW is asked
    for."""
    import diffusers.hooks  # noqa: F401
    from peft.import_utils import is_bnb_4bit_available, is_bnb_available

    is_bnb_available(), is_bnb_4bit_available()


def train(config: TrainConfig) -> TrainResult:
    """Run the checks, then train; on every rank of a launch (torchrun / accelerate launch) or alone."""
    use_cuda_allocator_defaults()
    check_run_paths(config)  # before the lock below creates --out: a file or a store there is refused untouched
    # the job's rank 0 holds the run folder from its first check on: a second run into it is refused at once
    main = int(os.environ.get("RANK", "0")) == 0
    with hold_run_folder(config.out) if main else contextlib.nullcontext():
        inputs = check_run(config)
        accelerator = make_accelerator(config)
        try:
            return _train(config, inputs, accelerator)
        finally:
            release_accelerator(accelerator)


@dataclass
class Stepper:
    """The prepared pieces of a run, and one optimizer step over them."""

    config: TrainConfig
    accelerator: Any
    model: torch.nn.Module
    """The transformer as accelerate prepared it (DDP-wrapped under data parallelism without --shard-optimizer)."""
    optimizer: Any
    lr_scheduler: Any
    noise_scheduler: Any
    """The model's scheduler: the noise schedule of training_step."""
    transformer_config: dict[str, Any]
    vae_config: dict[str, Any]
    empty_embedding: torch.Tensor
    """The empty prompt's T5 embedding [L, D], for caption dropout."""
    embed_dtype: torch.dtype
    """Dtype the embeddings are fed in: the frozen weights' (the pipelines feed the transformer's dtype)."""
    compile_counter: Any = None
    """With --compile, the `train.compile.CompileCounter` of the transformer's blocks."""
    sequence: SequenceParallel | None = None
    """This rank's sequence-parallel group (--sp-degree): its ranks share each batch. None: one rank per batch."""
    sharding: OptimizerSharding | None = None
    """With --shard-optimizer, what reduces the gradients in place of DDP, and clips them."""

    def __post_init__(self) -> None:
        # listed once: walking every parameter of a 5B model each step costs time for nothing
        self.trained = [p for p in self.model.parameters() if p.requires_grad]
        self.trained_rows: list[int] = []
        """Index rows of this rank's batches in the last step."""
        if self.sequence is None:
            self.sequence = SequenceParallel.unsplit(self.accelerator)

    def step(self, step: int, batches, stop_requested: bool = False) -> tuple[dict[str, float], dict[str, Any], bool]:
        """Optimizer step `step` (from 1) over the next --gradient-accumulation-steps batches.

        Returns the metrics (loss averaged over ranks and batches), the data position after the step, and
        whether any rank had `stop_requested` (a stop signal): every rank gets the same answer at the same step.
        """
        config, accelerator = self.config, self.accelerator
        device, world = accelerator.device, accelerator.num_processes
        accumulation = config.gradient_accumulation_steps
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        samples, grad_norm, data_wait = 0, None, 0.0
        self.trained_rows = []
        for micro in range(accumulation):
            waited = time.perf_counter()
            batch, position = next(batches)
            data_wait += time.perf_counter() - waited
            # the ranks of a sequence-parallel group draw alike: their data-parallel rank seeds the draws
            generator = step_generator(config.seed, self.sequence.dp_rank, (step - 1) * accumulation + micro,
                                       device)
            train_batch = to_train_batch(batch, device, self.embed_dtype)
            if config.caption_dropout > 0:
                train_batch.prompt_embeds = drop_captions(train_batch.prompt_embeds, self.empty_embedding,
                                                          config.caption_dropout, generator)
            if train_batch.image_latents is not None and config.image_dropout:
                train_batch.image_latents = drop_images(train_batch.image_latents, config.image_dropout, generator)
            with accelerator.accumulate(self.model), self.sequence.sharding():
                loss = training_step(self.model, self.noise_scheduler, train_batch,
                                     vae_scaling_factor=self.vae_config["scaling_factor"],
                                     invert_scale_latents=bool(self.vae_config.get("invert_scale_latents", False)),
                                     generator=generator, transformer_config=self.transformer_config)
                accelerator.backward(loss * self.sequence.loss_scale)
                if self.sharding is not None:
                    self.sharding.finish_backward()
                if accelerator.sync_gradients:
                    grad_norm = self.clip_gradients(config.max_grad_norm or math.inf)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            samples += batch[S.MEAN].shape[0]
            self.trained_rows += batch["rows"].tolist()
        # one collective for all three: the loss averaged over ranks, the samples summed, any rank's stop signal
        counts = torch.tensor([float(samples), float(stop_requested)], device=device)
        totals = accelerator.reduce(torch.cat([loss_sum[None], counts]), "sum")
        seconds = time.perf_counter() - started
        metrics = {
            "loss": totals[0].item() / (accumulation * world),
            "lr": self.lr_scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "step_time": seconds,
            "data_wait": data_wait,  # of step_time, waiting for the loader: near 0 unless storage is too slow
            "samples_per_s": totals[1].item() / self.sequence.degree / seconds,  # a group counts its sample once
        }
        if device.type == "cuda":  # not on a CUDA machine told --device cpu
            metrics["memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        return metrics, position, totals[2].item() > 0


    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip to `max_norm` over all ranks' gradients; returns their norm before."""
        if self.sharding is not None:
            return self.sharding.clip_grad_norm_(max_norm)
        return self.accelerator.clip_grad_norm_(self.trained, max_norm)


def prepare_sharded(accelerator, transformer: torch.nn.Module, optimizer, lr_scheduler):
    """--shard-optimizer: the model placed and autocast by accelerate but not wrapped in DDP (`evaluation_mode`
    skips only the wrappers), since `OptimizerSharding` reduces its gradients; the optimizer and the schedule
    prepared as usual. The hooks go on the bare optimizer, which accelerate's wrapper calls."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise CogtuneError("--shard-optimizer: plain data parallelism only; FSDP and DeepSpeed shard their own way")
    model = accelerator.prepare_model(transformer, evaluation_mode=True)
    sharding = OptimizerSharding(optimizer, accelerator.process_index, accelerator.num_processes)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    return model, optimizer, lr_scheduler, sharding


def prepare(config: TrainConfig, inputs: RunInputs, accelerator) -> tuple[Stepper, StoreLoader, int]:
    """Model, optimizer, lr schedule and data, prepared by accelerate; returns them and the run's step count."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    world = accelerator.num_processes
    if config.base_weights == "fp8":  # the parallelism is known once the accelerator exists; nothing written yet
        from .base_weights import check_fp8_parallelism

        check_fp8_parallelism(accelerator)
    heads = inputs.model.config("transformer")["num_attention_heads"]
    sequence = SequenceParallel.setup(config.sp_degree, accelerator, heads, inputs.model.variant.name)
    set_seed(config.seed)  # the LoRA init draws from the global generators: the same on every rank
    transformer = build_transformer(config, inputs.model)
    sequence.attach(transformer)
    compile_counter = None
    if config.compile:
        from .compile import compile_blocks

        compile_counter = compile_blocks(transformer)
    transformer_config = dict(transformer.config)
    optimizer = make_optimizer(config, [p for p in transformer.parameters() if p.requires_grad])
    loader = make_loader(config, sequence.dp_rank, sequence.dp_degree,
                         holdout_rows(config.store, config.eval_holdout))
    max_steps = total_steps(config, loader.steps_per_epoch)
    # accelerate steps a prepared schedule once per process per optimizer step
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps * world,
                                 num_training_steps=max_steps * world)
    sharding = None
    if config.shard_optimizer:
        model, optimizer, lr_scheduler, sharding = prepare_sharded(accelerator, transformer, optimizer, lr_scheduler)
    else:
        model, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    register_lora_checkpoint_hook(accelerator, config.mode)
    # float32 master weights for sft; for LoRA the frozen weights' dtype
    embed_dtype = WEIGHT_DTYPES[config.mixed_precision] if config.mode == "lora" else torch.float32
    stepper = Stepper(
        config=config,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        noise_scheduler=inputs.model.load_scheduler(),
        transformer_config=transformer_config,
        vae_config=inputs.model.config("vae"),
        empty_embedding=S.read_extras(config.store)[0]["empty_embedding"].to(accelerator.device, embed_dtype),
        embed_dtype=embed_dtype,
        compile_counter=compile_counter,
        sequence=sequence,
        sharding=sharding,
    )
    return stepper, loader, max_steps


def _train(config: TrainConfig, inputs: RunInputs, accelerator) -> TrainResult:
    started = time.perf_counter()
    stepper, loader, max_steps = prepare(config, inputs, accelerator)
    start_step = 0
    if inputs.resume_from is not None:
        start_step = resume(accelerator, stepper.model, stepper.lr_scheduler, loader, inputs.resume_from, config.mode,
                            config.seed)
    confirm_dataset_current(inputs.staleness, accelerator)  # rank 0's check ran while the model loaded
    if accelerator.is_main_process:
        start_run_folder(config, start_step)
    accelerator.init_trackers("cogtrain", config=tracker_config(config))
    accelerator.wait_for_everyone()
    log.info(run_banner(config, inputs, loader, accelerator, start_step, max_steps))

    validation_size = most_common_bucket(inputs.manifest)
    losses: list[float] = []
    step_times: list[float] = []
    evaluator = None
    if config.eval_every:  # a dataset of its own: the loader's is read by its prefetch thread
        evaluator = Evaluator(StoreDataset(config.store, seed=config.seed), sorted(loader.dataset.held_out),
                              config.seed)
    # every rank reads it (after rank 0 cut losses.jsonl back): eval figures are equal on all ranks, so all
    # reach the same decisions on the best step without a collective
    best = best_eval(config.out / LOSSES)
    progress = RunProgress(max_steps, start_step, bar=wants_bar(config.progress), log_every=config.log_every)
    batches = iter(loader)
    try:
        with StopSignals() as signals:
            for step in range(start_step + 1, max_steps + 1):
                metrics, position, stopping = stepper.step(step, batches, signals.requested)
                losses.append(metrics["loss"])
                step_times.append(metrics["step_time"])
                evaluated = evaluator is not None and (step % config.eval_every == 0 or step == max_steps)
                if evaluated:
                    metrics.update(evaluator.evaluate(stepper, accelerator))
                improved = evaluated and (best is None or metrics["eval_loss"] < best[1])
                if improved:
                    best = (step, metrics["eval_loss"])
                accelerator.log(metrics, step=step)
                if config.log_samples:
                    log_samples(config.out, accelerator.process_index, step, stepper.trained_rows)
                if accelerator.is_main_process:
                    log_step(config.out, step, position, metrics)
                progress.step_done(step, metrics)
                if stopping or step % config.checkpoint_every == 0 or step == max_steps or (improved and config.keep_best):
                    keep = best[0] if config.keep_best and best else None
                    checkpoint = save_checkpoint(accelerator, config.out, step, position, config.keep_checkpoints,
                                                 protect=keep)
                    if accelerator.is_main_process:
                        write_loss_plot(config.out)
                if stopping:  # the step in flight is checkpointed: leave before validation and the outputs
                    preempted = Preempted(step, str(checkpoint), signals.received)
                    progress.close()
                    log.warning("%s", preempted, extra=MAIN_ONLY)  # before the teardown a launcher may cut short
                    raise preempted
                # the last step's validation comes after the weights are written: it can never cost them
                if config.validate_every and step % config.validate_every == 0 and step < max_steps:
                    validate(config, accelerator, stepper.model, inputs.model, step, validation_size, progress)
    finally:
        batches.close()
        progress.close()
    seconds = time.perf_counter() - started
    card = CardFacts(clip_fps=inputs.manifest.settings.get("sampling", {}).get("fps"), steps=max_steps,
                     batch_sizes=dict(loader.sampler.batch_sizes), size=validation_size,
                     dataset=config.dataset or inputs.manifest.dataset.get("path"))
    outputs = finish_run(config, accelerator, stepper.model, inputs.model, start_step + len(losses), losses, seconds,
                         loader.dataset.damaged, step_times, card, best,
                         compiles=stepper.compile_counter.compiles if stepper.compile_counter else None)
    if config.validate_every and losses:
        validate(config, accelerator, stepper.model, inputs.model, max_steps, validation_size, progress)
        if accelerator.is_main_process:  # the card shows the last contact sheet, made just now
            write_card(config, inputs.model, card)
    return TrainResult(run=config.out, steps=max_steps, losses=losses, outputs=outputs, seconds=seconds)


def run_banner(config: TrainConfig, inputs: RunInputs, loader: StoreLoader, accelerator, start_step: int,
               max_steps: int) -> str:
    """The start banner (`train.progress.start_banner`) of this run."""
    device = f"{accelerator.device.type}, {config.mixed_precision} mixed precision"
    return start_banner(run=config.out, start_step=start_step, max_steps=max_steps,
                        resumed_from=inputs.resume_from, processes=accelerator.num_processes, device=device,
                        store=config.store, row_buckets=loader.dataset.training_row_buckets,
                        batch_sizes=loader.sampler.batch_sizes, held_out=len(loader.dataset.held_out),
                        steps_per_epoch=loader.steps_per_epoch, accumulation=config.gradient_accumulation_steps)


def start_run_folder(config: TrainConfig, start_step: int) -> None:
    """Rank 0, after every check and after the checkpoint loaded: config.yaml, and losses.jsonl cut back to
    the resumed step (a run killed after its last checkpoint logged steps that are trained again now)."""
    config.out.mkdir(parents=True, exist_ok=True)
    # what a run killed while checkpointing left (the run lock says no other run is writing them)
    for leftover in (config.out / CHECKPOINTS).glob(".*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    config.save(config.out)
    for log in [config.out / LOSSES, *sorted((config.out / SAMPLES).glob("rank-*.jsonl"))]:
        if log.exists():
            kept = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
            atomic_write_text(log, "".join(line + "\n" for line in kept))


def best_eval(losses: Path) -> tuple[int, float] | None:
    """(step, eval loss) of the lowest held-out loss losses.jsonl has logged; None before any."""
    if not losses.exists():
        return None
    logged = [json.loads(line) for line in losses.read_text().splitlines() if line]
    evaluated = [(entry["eval_loss"], entry["step"]) for entry in logged if "eval_loss" in entry]
    return (min(evaluated)[1], min(evaluated)[0]) if evaluated else None


def log_step(run: Path, step: int, position: dict[str, Any], metrics: dict[str, float]) -> None:
    """Append one line to losses.jsonl: what resume tests compare, and a log that needs no tensorboard."""
    with open(run / LOSSES, "a") as f:
        f.write(json.dumps({"step": step, "epoch": position["epoch"], **metrics}) + "\n")


def log_samples(run: Path, rank: int, step: int, rows: list[int]) -> None:
    """Append the index rows this rank trained at `step` to RUN/samples/rank-R.jsonl (--log-samples)."""
    folder = run / SAMPLES
    folder.mkdir(exist_ok=True)
    with open(folder / f"rank-{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "rows": rows}) + "\n")


def tracker_config(config: TrainConfig) -> dict[str, Any]:
    """The config as trackers take hyperparameters: scalars and strings only."""
    def scalar(value: Any) -> Any:
        if isinstance(value, list):
            return ",".join(value)
        return "default" if value is None else value

    return {name: scalar(value) for name, value in config.to_dict().items()}


def validate(config: TrainConfig, accelerator, model: torch.nn.Module, model_info: Model, step: int,
             size: tuple[int, int, int], progress: RunProgress | None = None) -> None:
    """Validation videos written by rank 0, announced with their own `progress`. The generators are put back
    afterwards, so a run with validation trains exactly as one without.

    With whole weights on every rank (one process, DDP, --shard-optimizer) rank 0 generates alone and the others
    wait. With sharded weights (FSDP, ZeRO-3) every forward pass gathers each layer from all ranks, a collective
    they must all take part in, so every rank generates the same videos and rank 0 alone writes them.
    """
    if accelerator.is_main_process or weights_are_sharded(accelerator):
        from .validation import run_validation

        frames, height, width = size
        generators = RngStates.capture()
        try:
            run_validation(accelerator.unwrap_model(model), model_info, config.store, config.out, step,
                           device=accelerator.device, dtype=WEIGHT_DTYPES[config.mixed_precision], seed=config.seed,
                           num_inference_steps=config.validation_inference_steps, num_frames=frames,
                           height=height, width=width, write=accelerator.is_main_process, progress=progress)
        except Exception as e:  # out of memory, a codec error: the videos are lost, never the run
            # (with sharded weights a rank that fails here leaves the others in a collective: nothing to catch)
            log.warning("validation at step %d failed, training goes on: %s: %s", step, type(e).__name__, e,
                        extra=MAIN_ONLY)
        finally:
            generators.restore()
    accelerator.wait_for_everyone()


def weights_are_sharded(accelerator) -> bool:
    """Whether each rank holds only a shard of the weights: FSDP, or DeepSpeed ZeRO-3."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def weights_digests(accelerator, model: torch.nn.Module) -> list[str] | None:
    """sha256 of each rank's trained weights, gathered on every rank: data parallelism must keep them equal.

    None where the weights are sharded across ranks (FSDP, ZeRO-3), so no rank holds them whole.
    """
    if weights_are_sharded(accelerator):
        return None
    digest = hashlib.sha256()
    for name, parameter in sorted(accelerator.unwrap_model(model).named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
    words = torch.from_numpy(np.frombuffer(digest.digest(), dtype=np.int64).copy()).to(accelerator.device)
    gathered = accelerator.gather(words).cpu().reshape(accelerator.num_processes, -1)
    return [row.numpy().tobytes().hex() for row in gathered]


def finish_run(config: TrainConfig, accelerator, model: torch.nn.Module, model_info: Model, steps: int,
               losses: list[float], seconds: float, damaged: list[dict[str, Any]],
               step_times: list[float], card: CardFacts, best: tuple[int, float] | None,
               compiles: int | None = None) -> list[Path]:
    """Rank 0 writes the trained weights, the model card and summary.json, and prints the summary.

    `damaged`: the samples this rank skipped as damaged (--on-damaged skip); summary.json lists every rank's.
    `step_times`: the seconds of each optimizer step this invocation took; their median is the step time (the
    wall time also holds start-up, checkpoints and validation).
    `compiles`: with --compile, the graphs this process compiled (rank 0's, as every rank compiles the same).
    """
    from accelerate.utils import gather_object

    from .outputs import save_full, save_lora

    digests = weights_digests(accelerator, model)
    # every rank's, once each: ranks that meet the same damaged sample (another epoch's batch) name it alike
    damaged = list({d["key"]: d for d in gather_object(damaged)}.values()) if accelerator.num_processes > 1 else damaged
    steps_per_rank = accelerator.gather(torch.tensor([steps], device=accelerator.device)).tolist()  # equal, or DDP hangs
    # sharded weights (FSDP, ZeRO-3) are gathered whole for rank 0: a collective every rank takes part in
    gathered = accelerator.get_state_dict(model) if weights_are_sharded(accelerator) else None
    outputs: list[Path] = []
    if accelerator.is_main_process:
        transformer = accelerator.unwrap_model(model)
        if config.mode == "lora":
            weights = save_lora(transformer, config.out, rank=config.rank, alpha=config.alpha,
                                target_modules=config.target_modules, state_dict=gathered)
        else:
            weights = save_full(transformer, config.out, state_dict=gathered)
        write_loss_plot(config.out)
        outputs = [weights, write_card(config, model_info, card)]
        summary = {
            "steps": steps,
            "steps_per_rank": steps_per_rank,
            "trained_weights_sha256_per_rank": digests,
            "steps_this_run": len(losses),
            "seconds_this_run": round(seconds, 3),
            "step_time_median_s": round(statistics.median(step_times), 4) if step_times else None,
            "final_loss": losses[-1] if losses else None,
            "compiles": compiles,
            "software": software_versions(),
            "best_eval_step": best[0] if best else None,
            "best_eval_loss": best[1] if best else None,
            "damaged_samples_skipped": [{k: d[k] for k in ("key", "source", "error")} for d in damaged],
            "outputs": [str(p) for p in outputs],
        }
        atomic_write_text(config.out / SUMMARY, json.dumps(summary, indent=2))
        print_summary(config, summary, outputs, digests)
    accelerator.wait_for_everyone()
    return outputs


@dataclass
class CardFacts:
    """What the model card states beyond the options as given: the values the run resolved them to."""

    clip_fps: float | None
    """The frame rate cogprep sampled the clips at (None: each source's own)."""
    steps: int
    """Optimizer steps of the whole run (--max-steps, or what --epochs came to)."""
    batch_sizes: dict[str, int]
    """Each bucket's batch size (--batch-size, else the store's)."""
    size: tuple[int, int, int]
    """(frames, height, width) the run validated at: its most common bucket."""
    dataset: str | Path | None
    """The dataset the store was checked against (--dataset, else the one store.json records)."""


def card_settings(config: TrainConfig, card: CardFacts, model: str) -> dict[str, Any]:
    """The settings table: every option with the value the run used (absolute paths, `model` as the card names
    it, the LoRA alpha in effect, each bucket's batch size, the step count), no option left at null; ``none``
    where an option is off."""
    settings = config.to_dict()
    settings.update(
        model=model, store=str(config.store.resolve()), out=str(config.out.resolve()), max_steps=card.steps,
        lora_alpha=config.alpha, batch_size=card.batch_sizes,
        dataset=str(Path(card.dataset).resolve()) if card.dataset is not None else "none",
    )
    return {name: "none" if value is None else value for name, value in settings.items()}


def write_card(config: TrainConfig, model_info: Model, card: CardFacts) -> Path:
    """The model card, with the loss plot and the last validation contact sheet where the run made them."""
    from ..shared.models import is_hub_id
    from .outputs import write_model_card

    sheets = sorted((config.out / "validation").glob("step-*.png"))
    pictures = [p.relative_to(config.out) for p in (config.out / PLOT, *sheets[-1:]) if p.exists()]
    base = model_info.source if is_hub_id(model_info.source) else str(model_info.path)  # a local folder: absolute
    return write_model_card(config.out, card_settings(config, card, base), base, model_info.variant,
                            OUTPUT_KIND[config.mode], clip_fps=card.clip_fps, pictures=pictures, size=card.size)


def print_summary(config: TrainConfig, summary: dict[str, Any], outputs: list[Path],
                  digests: list[str] | None) -> None:
    trained, seconds = summary["steps_this_run"], summary["seconds_this_run"]
    line = f"step {summary['steps']}"
    if trained:
        line += (f", {trained} trained in {seconds:.1f} s of wall time (start-up, checkpoints and validation "
                 f"included); median step {summary['step_time_median_s']:.3f} s")
        line += f", final loss {summary['final_loss']:.4f}"
    lines = [line, *(f"  {path}" for path in outputs)]
    checkpoints = complete_checkpoints(config.out)
    if checkpoints:
        lines.append(f"  {checkpoints[-1]}  (resume with --resume latest)")
    if summary["compiles"] is not None:
        lines.append(f"  {summary['compiles']} compiles of the transformer blocks (--compile; shapes are dynamic: "
                     f"not one per bucket)")
    log.info("\n".join(lines))
    if summary["damaged_samples_skipped"]:
        log.warning("skipped %d damaged samples (listed in summary.json): run cogprep verify %s, then cogprep "
                    "encode", len(summary["damaged_samples_skipped"]), config.store)
    if digests is not None and len(set(digests)) > 1:
        log.warning("the ranks ended with different weights (see summary.json)")
