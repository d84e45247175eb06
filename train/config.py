"""`TrainConfig`: every setting of a cogtrain run, one field per ``cogtrain run`` option, same names.

The docstring under each field is its ``--help`` text (`shared.options.field_help`), so the dataclass is the one
place an option is described. A ``--config FILE`` (YAML/TOML) uses the same keys; a run saves its resolved config as
``RUN/config.yaml``, which ``--config`` reads back unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..shared.atomic import atomic_write_text
from ..shared.config import load_config_file
from ..shared.errors import CogtuneError
from .peer_options import renamed_config_keys

MODES = ("lora", "sft")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
REPORT_TO = ("tensorboard", "wandb", "none")
DEVICES = ("auto", "cpu", "cuda")
ON_DAMAGED = ("stop", "skip")
BASE_WEIGHTS = ("bf16", "fp8")
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
CONFIG_YAML = "config.yaml"


@dataclass
class TrainConfig:
    """One cogtrain run."""

    store: Path
    """Store folder written by cogprep encode."""
    model: str
    """CogVideoX model the store was encoded with: a local diffusers folder or a hub id."""
    out: Path
    """Run folder: checkpoints, LoRA or full weights, logs, validation videos, config.yaml."""
    mode: str = "lora"
    """lora: train a LoRA adapter on frozen weights; sft: train every transformer weight."""
    rank: int = 64
    """LoRA rank."""
    lora_alpha: float | None = None
    """LoRA alpha (default: the rank, so the adapter's scale alpha/rank is 1)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    """Comma-separated module names the LoRA adapts."""
    max_steps: int | None = None
    """Optimizer steps to train (wins over --epochs)."""
    epochs: int = 1
    """Passes over the store, when --max-steps is not given."""
    batch_size: int | None = None
    """Samples per batch in every bucket (default: each bucket's batch size from the store, else 1)."""
    gradient_accumulation_steps: int = 1
    """Batches per optimizer step."""
    learning_rate: float = 1e-4
    """Peak learning rate (prodigy: use about 1.0)."""
    lr_scheduler: str = "constant"
    """Learning-rate schedule (diffusers.optimization): constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""
    optimizer: str = "adamw"
    """adamw; adamw8bit (needs bitsandbytes); prodigy (needs prodigyopt)."""
    weight_decay: float = 1e-4
    """Decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0: no clipping)."""
    mixed_precision: str = "bf16"
    """no, fp16 or bf16: autocast dtype; LoRA keeps frozen weights in it, trained weights stay float32."""
    base_weights: str = "bf16"
    """LoRA only. bf16: the frozen transformer weights kept in the --mixed-precision dtype; fp8: kept in float8
    (e4m3), each layer upcast to that dtype for its computation (CogVideoX-5b: 5.9 GiB instead of 10.4; patch and
    time embeddings, norms and the output projection stay as with bf16; the LoRA stays float32)."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: much less memory, about a third more compute."""
    offload_checkpoints: bool = False
    """With gradient checkpointing, keep each block's checkpointed input in host memory until the backward pass
    (CogVideoX-5b at 49x480x720: 4.2 GiB less GPU memory, as much more pinned host memory, and a copy out and
    back per block and step)."""
    compile: bool = False
    """torch.compile each transformer block (inductor, shapes dynamic so the buckets share compiled code; not with
    --base-weights fp8); the first steps take longer while it compiles."""
    sp_degree: int = 1
    """Sequence parallelism (Ulysses): the ranks that train each sample together, each holding 1/N of its tokens
    (launch N x the data-parallel degree processes; N must divide the attention heads, 48 for 5b and 1.5, 30 for
    2b, and the number of processes). Trains as one process would; per-rank activations fall as 1/N."""
    shard_optimizer: bool = False
    """ZeRO-2 over the launch's processes: each keeps the gradients and AdamW state of 1/W of the trained weights
    and broadcasts the ones it updates (8 processes, CogVideoX1.5-5B LoRA rank 128: 1.47 GiB -> 0.18 GiB each).
    Trains as DDP does; checkpoints hold the whole state and resume with or without it. With --optimizer adamw;
    not with FSDP, DeepSpeed (they shard their own way), --mixed-precision fp16 or --compile."""
    caption_dropout: float = 0.0
    """Probability of training a sample on the empty prompt (for classifier-free guidance)."""
    image_dropout: float | None = None
    """I2V: zero the image condition of this share of samples, as the release trained (default 0.05 for
    image-to-video models; text-to-video models have no image condition)."""
    seed: int = 0
    """Seed of the LoRA init, the data order and every noise draw."""
    checkpoint_every: int = 500
    """Save a resumable checkpoint every N optimizer steps (and at the end)."""
    keep_checkpoints: int = 3
    """Checkpoints to keep, newest first (0: keep all)."""
    resume: str | None = None
    """latest (the newest checkpoint in RUN, or a fresh start if none) or a checkpoint folder."""
    validate_every: int = 0
    """Generate validation videos every N steps and at the end (0: never)."""
    validation_inference_steps: int = 50
    """Denoising steps the pipeline takes for each validation video (how often validation runs: --validate-every)."""
    allow_stale: bool = False
    """Train even if the dataset changed since the store was encoded."""
    dataset: Path | None = None
    """Dataset to check the store against (default: the path recorded in store.json)."""
    report_to: str = "tensorboard"
    """Metrics logger: tensorboard, wandb or none."""
    prefetch: int = 1
    """Batches read ahead in a background thread, in host memory (0: read in the training loop). One hides the
    read (tens of ms) behind the step (seconds at real size); more only helps storage with slow spells."""
    eval_holdout: float | None = None
    """Samples kept out of training for the held-out loss: a count, or a fraction of the store below 1 (e.g.
    0.02); the same store and value always give the same set."""
    eval_every: int = 0
    """Compute the held-out loss (fixed timesteps and draws: it moves only when the weights do) every N steps
    and at the end (0: never; needs --eval-holdout)."""
    keep_best: bool = False
    """Keep the checkpoint of the step with the lowest held-out loss, whatever --keep-checkpoints says."""
    log_samples: bool = False
    """Write RUN/samples/rank-R.jsonl: the index rows each rank trained at each step (what a resumed run took)."""
    on_damaged: str = "stop"
    """A cached sample that fails to read: stop (exit 2 naming shard, sample and source; the last checkpoint
    stays the last good one), or skip (train on another sample of its bucket in its place, named in the log and
    summary.json)."""
    device: str = "auto"
    """auto (the accelerator accelerate picks: cuda:LOCAL_RANK if present), cpu or cuda."""
    progress: bool = True
    """Show a progress bar on a terminal (with --no-progress, or output to a file or pipe: a log line every
    --log-every steps instead)."""
    log_every: int | None = None
    """Without a bar: a log line of loss, s/step and ETA every N steps (default: about 20 lines over the run)."""

    def __post_init__(self) -> None:
        self.store = Path(self.store)
        self.out = Path(self.out)
        self.dataset = None if self.dataset is None else Path(self.dataset)
        self.target_modules = parse_target_modules(self.target_modules)

    @property
    def alpha(self) -> float:
        """The LoRA alpha in effect."""
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)

    def validate(self) -> None:
        """Refuse values no run can use, with one line naming the option."""
        for option, value, allowed in (
            ("mode", self.mode, MODES),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("mixed-precision", self.mixed_precision, MIXED_PRECISION),
            ("lr-scheduler", self.lr_scheduler, LR_SCHEDULERS),
            ("report-to", self.report_to, REPORT_TO),
            ("device", self.device, DEVICES),
            ("on-damaged", self.on_damaged, ON_DAMAGED),
            ("base-weights", self.base_weights, BASE_WEIGHTS),
        ):
            if value not in allowed:
                raise CogtuneError(f"--{option} {value!r}: choose one of {', '.join(allowed)}")
        for option, value, minimum in (
            ("rank", self.rank, 1),
            ("max-steps", self.max_steps, 1),
            ("epochs", self.epochs, 1),
            ("batch-size", self.batch_size, 1),
            ("gradient-accumulation-steps", self.gradient_accumulation_steps, 1),
            ("lr-warmup-steps", self.lr_warmup_steps, 0),
            ("checkpoint-every", self.checkpoint_every, 1),
            ("keep-checkpoints", self.keep_checkpoints, 0),
            ("validate-every", self.validate_every, 0),
            ("eval-every", self.eval_every, 0),
            ("eval-holdout", self.eval_holdout, 0),
            ("validation-inference-steps", self.validation_inference_steps, 1),
            ("log-every", self.log_every, 1),
            ("prefetch", self.prefetch, 0),
            ("seed", self.seed, 0),
            ("sp-degree", self.sp_degree, 1),
        ):
            if value is not None and value < minimum:
                raise CogtuneError(f"--{option} {value}: must be at least {minimum}")
        for option, value in (("lora-dropout", self.lora_dropout), ("caption-dropout", self.caption_dropout),
                              ("image-dropout", self.image_dropout or 0.0)):
            if not 0.0 <= value < 1.0:
                raise CogtuneError(f"--{option} {value}: must be in [0, 1)")
        if self.eval_every and not self.eval_holdout:
            raise CogtuneError(f"--eval-every {self.eval_every}: needs --eval-holdout K, the samples to evaluate on")
        if self.keep_best and not self.eval_every:
            raise CogtuneError("--keep-best: needs --eval-every N (and --eval-holdout K) to know which step is best")
        if self.eval_holdout and self.eval_holdout >= 1 and self.eval_holdout != int(self.eval_holdout):
            raise CogtuneError(f"--eval-holdout {self.eval_holdout:g}: a count (a whole number) or a fraction below 1")
        if self.learning_rate <= 0:
            raise CogtuneError(f"--learning-rate {self.learning_rate}: must be positive")
        if self.offload_checkpoints and not self.gradient_checkpointing:
            raise CogtuneError("--offload-checkpoints: needs --gradient-checkpointing (it offloads what that keeps)")
        if self.base_weights == "fp8" and self.mode != "lora":
            raise CogtuneError("--base-weights fp8: LoRA only (--mode sft trains the weights it would store in fp8)")
        if self.base_weights == "fp8" and self.compile:
            # the casting hooks swap each layer's weight between float8 and the compute dtype around its forward;
            # a compiled block's backward then finds the float8 weight it saved as bf16 and fails
            raise CogtuneError("--compile: not with --base-weights fp8 (its per-layer casting breaks compiled blocks)")
        if self.sp_degree > 1 and self.compile:  # the all-to-all inside the blocks is untested under inductor
            raise CogtuneError(f"--sp-degree {self.sp_degree}: not with --compile")
        if self.shard_optimizer:
            # Prodigy and 8-bit AdamW keep state over all weights (Prodigy's step size, bitsandbytes' own state
            # dict); fp16's loss scaler would find an overflow on one process's share and skip the step there only
            for option, value, refused in (("optimizer", self.optimizer, ("adamw8bit", "prodigy")),
                                           ("mixed-precision", self.mixed_precision, ("fp16",))):
                if value in refused:
                    raise CogtuneError(f"--shard-optimizer: not with --{option} {value}")
            if self.compile:  # the hooks on the weights' gradients are untested under inductor
                raise CogtuneError("--shard-optimizer: not with --compile")
        if self.mode == "lora" and not self.target_modules:
            raise CogtuneError("--target-modules: name at least one module for the LoRA")

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-ready values under the option names (paths as strings)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    def save(self, run: Path) -> Path:
        """Write ``RUN/config.yaml``: a ``--config`` file that reproduces this run."""
        path = Path(run) / CONFIG_YAML
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def from_file(cls, path: Path) -> TrainConfig:
        """Read a config file written by `save` (or by hand, with every required key)."""
        values = load_config_file(path)
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        renamed = renamed_config_keys(set(unknown))
        if renamed:
            raise CogtuneError(f"{path}: {renamed}")
        if unknown:
            raise CogtuneError(f"{path}: unknown option(s) {', '.join(unknown)}")
        try:
            return cls(**values)
        except TypeError as e:
            raise CogtuneError(f"{path}: {e}") from None


def parse_target_modules(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """Module names from ``to_q,to_k`` (command line) or a list (config file)."""
    names = value.split(",") if isinstance(value, str) else list(value)
    return [str(name).strip() for name in names if str(name).strip()]
