"""Gradient checkpointing with the checkpointed inputs kept in host memory (``--offload-checkpoints``).

With gradient checkpointing each transformer block keeps only its inputs for the backward pass and recomputes
the rest. Those inputs are what grows with the video: for CogVideoX-5b at 49x480x720 the 17,550 video tokens
of width 3072 in bfloat16 are 107 MB per block, 4.2 GiB over its 42 blocks (its bfloat16 weights with a LoRA
of rank 128 are 10.9 GiB, their gradients and AdamW state 1.4 GiB). Here each block's video-token input is
copied to pinned host memory without waiting as the forward pass reaches the block, the block runs on the
device copy, which is then freed, and the recompute in the backward pass copies the input back. The text
tokens and the time embedding (a few MB) stay on the device. The cost is one copy out and one back per block
and step.

Everything else is PyTorch's own non-reentrant checkpointing (`torch.utils.checkpoint.checkpoint`): gradients
flow along the graph of the forward pass, the recompute only refills the values it dropped, so RNG state,
autocast and inputs that need no gradient behave exactly as with plain ``--gradient-checkpointing``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.checkpoint


def copy_to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A detached copy in host memory: pinned and asynchronous from CUDA (the copy back, queued on the same
    stream in the backward pass, runs after it)."""
    if tensor.device.type == "meta":  # a shape-only run (bench_train.py --dry-run): nothing to copy
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
    if tensor.device.type != "cuda":
        return tensor.detach().to("cpu", copy=True)
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
    return host.copy_(tensor.detach(), non_blocking=True)


def offloaded_checkpoint(block: torch.nn.Module, hidden_states: torch.Tensor, *args: Any):
    """A ``gradient_checkpointing_func`` for diffusers models: ``block(hidden_states, *args)`` checkpointed,
    with `hidden_states` held in host memory, not on the device, until the backward pass recomputes the block."""
    device, requires_grad = hidden_states.device, hidden_states.requires_grad
    on_host = copy_to_host(hidden_states)
    first_run = [hidden_states]  # the forward pass uses the device tensor; the list then drops it

    def run(on_host: torch.Tensor, *args: Any):
        if first_run:
            return block(first_run.pop(), *args)
        # the recompute: the same values, needing gradients as the original did, so the same tensors get saved
        return block(on_host.to(device, non_blocking=True).requires_grad_(requires_grad), *args)

    return torch.utils.checkpoint.checkpoint(run, on_host, *args, use_reentrant=False)
