"""The trainer's own resume state: step, data position, extra metadata and every random generator's state.

Saved into a checkpoint folder beside what accelerate writes for the model and optimizer:

    CHECKPOINT/
      train_state.json            step, sampler position, extra metadata (written by rank 0)
      rng.safetensors             rank 0's generator states; rank r > 0 writes rng.rank<r>.safetensors

Tensors go to safetensors and the rest to JSON: nothing is pickled, so loading a checkpoint runs no code.
Each rank keeps its own generator file because ranks draw different noise; the sampler position is the same on
every rank, so one JSON serves them all.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..shared.atomic import atomic_path, atomic_write_text
from ..shared.errors import CogtuneError

TRAIN_STATE_JSON = "train_state.json"
FORMAT = "cogtune-train-state"
FORMAT_VERSION = 1


def rng_file_name(rank: int) -> str:
    return "rng.safetensors" if rank == 0 else f"rng.rank{rank}.safetensors"


@dataclass
class RngStates:
    """The states of the generators a training step may draw from, in this process."""

    python: tuple
    """`random.getstate()`: (version, 625 Mersenne Twister words, gauss_next)."""
    numpy: tuple
    """`numpy.random.get_state()` of the legacy global generator: (name, 624 words, pos, has_gauss, cached)."""
    torch_cpu: torch.Tensor
    """`torch.get_rng_state()`."""
    torch_cuda: list[torch.Tensor]
    """`torch.cuda.get_rng_state_all()`, one per visible device; empty without CUDA."""

    @classmethod
    def capture(cls) -> RngStates:
        return cls(
            python=random.getstate(),
            numpy=np.random.get_state(),
            torch_cpu=torch.get_rng_state(),
            torch_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        )

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda and torch.cuda.is_available():
            # a run resumed on fewer devices restores those it has
            for device, state in enumerate(self.torch_cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, device)

    def save(self, path: Path) -> None:
        python_version, python_words, python_gauss = self.python
        numpy_name, numpy_words, numpy_pos, numpy_has_gauss, numpy_cached = self.numpy
        tensors = {
            "python_words": torch.tensor(python_words, dtype=torch.int64),
            "numpy_words": torch.from_numpy(np.asarray(numpy_words, dtype=np.int64)),
            "torch_cpu": self.torch_cpu,
        }
        tensors.update({f"torch_cuda_{i}": state for i, state in enumerate(self.torch_cuda)})
        scalars = {
            "python_version": python_version,
            "python_gauss": python_gauss,
            "numpy_name": numpy_name,
            "numpy_pos": int(numpy_pos),
            "numpy_has_gauss": int(numpy_has_gauss),
            "numpy_cached": float(numpy_cached),
            "torch_cuda_devices": len(self.torch_cuda),
        }
        with atomic_path(path) as tmp:
            tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
            save_file(tensors, str(tmp), metadata={"rng": json.dumps(scalars)})

    @classmethod
    def load(cls, path: Path) -> RngStates:
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                scalars = json.loads((f.metadata() or {})["rng"])
        except FileNotFoundError:
            raise CogtuneError(f"{path}: missing (was the checkpoint saved with as many processes?)") from None
        except (KeyError, ValueError, OSError) as e:
            raise CogtuneError(f"{path}: not a cogtune generator state file ({e})") from None
        return cls(
            python=(scalars["python_version"], tuple(tensors["python_words"].tolist()), scalars["python_gauss"]),
            numpy=(
                scalars["numpy_name"],
                tensors["numpy_words"].numpy().astype(np.uint32),
                scalars["numpy_pos"],
                scalars["numpy_has_gauss"],
                scalars["numpy_cached"],
            ),
            torch_cpu=tensors["torch_cpu"],
            torch_cuda=[tensors[f"torch_cuda_{i}"] for i in range(scalars["torch_cuda_devices"])],
        )


@dataclass
class TrainState:
    """Everything the trainer needs, besides model and optimizer, to continue a run exactly where it stopped."""

    step: int = 0
    """Optimizer steps done."""
    sampler: dict[str, Any] = field(default_factory=dict)
    """Data position after the last trained batch: the loader's ``position`` (`BucketBatchSampler.state_dict`)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """JSON-ready values the trainer wants back on resume (e.g. the run's config hash, smoothed loss)."""
    rng: RngStates | None = field(default_factory=RngStates.capture)
    """This process's generator states; by default those at the moment the TrainState is made. None when read
    from a checkpoint that has no file for this rank (saved by fewer processes)."""

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return int(self.sampler.get("epoch", 0))


def save_checkpoint_dir(path: Path, state: TrainState, rank: int = 0) -> None:
    """Write `state` into the checkpoint folder `path`: rank 0 writes train_state.json, every rank its RNG file.

    Every file is written atomically. Call it on every rank (the caller synchronises ranks around it).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state.rng.save(path / rng_file_name(rank))
    if rank == 0:
        document = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "step": state.step,
            "epoch": state.epoch,  # for people reading the file; the sampler position is what resumes
            "sampler": state.sampler,
            "extra": state.extra,
        }
        atomic_write_text(path / TRAIN_STATE_JSON, json.dumps(document, indent=2, sort_keys=True))


def load_checkpoint_dir(path: Path, rank: int = 0) -> TrainState:
    """Read the TrainState of `rank` from the checkpoint folder `path`. Call ``state.rng.restore()`` to apply it."""
    path = Path(path)
    json_path = path / TRAIN_STATE_JSON
    try:
        document = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise CogtuneError(f"{json_path}: missing: not a cogtrain checkpoint") from None
    except ValueError as e:
        raise CogtuneError(f"{json_path}: not valid JSON ({e})") from None
    if document.get("format") != FORMAT:
        raise CogtuneError(f"{json_path}: not a cogtrain train state")
    if document.get("version") != FORMAT_VERSION:
        raise CogtuneError(
            f"{json_path}: train state version {document.get('version')}, this cogtune reads {FORMAT_VERSION}"
        )
    return TrainState(
        step=int(document["step"]),
        sampler=document["sampler"],
        extra=document["extra"],
        rng=RngStates.load(path / rng_file_name(rank)) if (path / rng_file_name(rank)).exists() else None,
    )
