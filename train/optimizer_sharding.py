"""Sharded gradients and optimizer state for the trained weights: ``cogtrain run --shard-optimizer``.

ZeRO stage 2 (Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models",
arXiv:1910.02054, section 5.2) over every process of the launch. Each trained weight has one owner process.
Its gradient is summed onto the owner as soon as the backward pass has made it, and the other processes drop
their copy. Only the owner keeps the gradient and the AdamW state, and only the owner updates the weight; it then
broadcasts the new value to the others. Every process still holds every weight, so the forward pass, validation
and the saved weights are as with DDP. At 8 processes a LoRA's gradients and AdamW state take 1/8 of the memory
they take under DDP (CogVideoX1.5-5B, LoRA rank 128: 1.47 GiB -> 0.18 GiB per process).

Exactly DDP's arithmetic: each process's gradient is divided by the number of processes before the sum, as
DDP divides before its all-reduce (torch.nn.parallel.DistributedDataParallel, ``gradient_predivide_factor``).
Gradient accumulation sums on the owner: the owner's gradient from the micro-steps before is in ``.grad`` when
autograd adds this micro-step's share, and that sum goes into the reduce. The others start each micro-step from
nothing, so each share is counted once. Clipping uses the norm over all owners' gradients, which is the norm
``torch.nn.utils.clip_grad_norm_`` computes over whole gradients.

Order: every process must issue the same collectives in the same order. Gradients are reduced in one fixed order
(the trained weights, last first: about the order the backward pass makes them). A gradient made out of that
order waits until the ones before it are reduced, as DDP's buckets do.

Checkpoints hold the whole optimizer state. When a checkpoint is saved, every owner sends its state to process 0,
which writes it in the layout of an unsharded optimizer. When one is loaded, each process keeps the state of the
weights it owns. So a checkpoint resumes on any number of processes, with or without ``--shard-optimizer``.

Not taken: ``torch.distributed.optim.ZeroRedundancyOptimizer``. It shards the state but not the gradients, which
DDP still holds whole, and its ``consolidate_state_dict`` sends the state between processes as pickles. DeepSpeed
and FSDP shard their own way, and cogtrain refuses both with ``--sp-degree`` and ``--base-weights fp8``.

On the meta device (``scripts/bench_train.py --dry-run`` counts one process's memory) no collective runs: each
process keeps its own share, as it would.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist


def assign_owners(sizes: list[int], world: int) -> list[int]:
    """The owning process of each of the weights with these element counts: the largest first, each to the
    least-loaded process (the lowest rank on a tie). Every process computes the same answer."""
    owners, loads = [0] * len(sizes), [0] * world
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owner = min(range(world), key=lambda r: (loads[r], r))
        owners[index] = owner
        loads[owner] += sizes[index]
    return owners


class OptimizerSharding:
    """The hooks that shard `optimizer`'s gradients and state over `world` processes (this one is `rank`).

    The optimizer must skip weights without a gradient, as torch's AdamW does. Call `finish_backward` after each
    backward pass, and `clip_grad_norm_` instead of torch's before the step."""

    def __init__(self, optimizer: torch.optim.Optimizer, rank: int, world: int):
        self.optimizer, self.rank, self.world = optimizer, rank, world
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]
        """In the optimizer's order: a state dict's index of a weight is its position here."""
        self.owners = assign_owners([p.numel() for p in self.parameters], world)
        self.order = list(reversed(range(len(self.parameters))))
        """The fixed order of the reduces."""
        self.place_in_order = {index: k for k, index in enumerate(self.order)}
        self.position = {id(p): i for i, p in enumerate(self.parameters)}
        self.ready: set[int] = set()
        self.reduced = 0
        """How many of `order` this backward pass has reduced."""
        for parameter in self.parameters:
            if world > 1:  # before autograd adds it to .grad: divide this process's share, as DDP does
                parameter.register_hook(self._divide)
            parameter.register_post_accumulate_grad_hook(self._accumulated)
        optimizer.register_step_post_hook(lambda *_: self._broadcast_weights())
        optimizer.register_state_dict_post_hook(lambda _, state: self._gather_state(state))
        optimizer.register_load_state_dict_pre_hook(lambda _, state: self._own_state(state))
        self._broadcast_weights(from_rank=0)  # start alike, as DDP makes sure when it wraps a model

    def owned(self, parameter: torch.nn.Parameter) -> bool:
        return self.owners[self.position[id(parameter)]] == self.rank

    @property
    def owned_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters if self.owned(p))

    # ---- the backward pass

    def _divide(self, grad: torch.Tensor) -> torch.Tensor:
        return grad / self.world

    def _accumulated(self, parameter: torch.nn.Parameter) -> None:
        index = self.position[id(parameter)]
        if index in self.ready or self.place_in_order[index] < self.reduced:
            # e.g. a reentrant checkpoint running a second backward: the gradient reduced already would be incomplete
            raise RuntimeError(f"--shard-optimizer: weight {index} got a gradient twice in one backward pass")
        self.ready.add(index)
        while self.reduced < len(self.order) and self.order[self.reduced] in self.ready:
            self._reduce(self.order[self.reduced])

    def finish_backward(self) -> None:
        """Reduce what the backward pass left (a weight it gave no gradient: zeros), and start the next count."""
        while self.reduced < len(self.order):
            self._reduce(self.order[self.reduced])
        self.ready.clear()
        self.reduced = 0

    def _reduce(self, index: int) -> None:
        parameter, owner = self.parameters[index], self.owners[index]
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        if parameter.device.type != "meta" and self.world > 1:
            dist.reduce(parameter.grad, dst=owner, op=dist.ReduceOp.SUM)
        if owner != self.rank:
            parameter.grad = None  # the owner has the sum; without a gradient the optimizer skips the weight
        self.ready.discard(index)
        self.reduced += 1

    # ---- clipping and the step

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients so that their norm over all processes is at most `max_norm`; returns the norm
        before, as torch.nn.utils.clip_grad_norm_ does (the same 1e-6 in the divisor)."""
        owned = [p.grad for p in self.parameters if p.grad is not None]
        device = self.parameters[0].device
        squares = torch.zeros((), device=device, dtype=torch.float32)
        for grad in owned:
            squares += torch.linalg.vector_norm(grad, dtype=torch.float32) ** 2
        if device.type != "meta" and self.world > 1:
            dist.all_reduce(squares, op=dist.ReduceOp.SUM)
        total = squares.sqrt()
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in owned:
            grad.mul_(scale.to(grad.dtype))
        return total

    @torch.no_grad()
    def _broadcast_weights(self, from_rank: int | None = None) -> None:
        """Every weight from its owner (or from `from_rank`) to the other processes."""
        if self.world == 1:
            return
        for index, parameter in enumerate(self.parameters):
            if parameter.device.type != "meta":
                dist.broadcast(parameter.data, src=self.owners[index] if from_rank is None else from_rank)

    # ---- checkpoints

    def _gather_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """`state_dict`'s post hook (every process calls `state_dict` when accelerate saves): process 0 returns
        the whole state, the others their own share."""
        if self.world == 1 or self.parameters[0].device.type == "meta":
            return state_dict
        layout = self._state_layouts(state_dict["state"])
        device = self.parameters[0].device
        whole: dict[int, dict[str, Any]] = {}
        for index in range(len(self.parameters)):
            owner = self.owners[index]
            for key, entry in layout[owner].get(str(index), {}).items():
                if not isinstance(entry, dict):  # a number: it travelled in the layout
                    whole.setdefault(index, {})[key] = entry
                    continue
                if owner == self.rank:
                    value = state_dict["state"][index][key]
                    sent = value.to(device)
                else:
                    sent = torch.empty(entry["shape"], dtype=getattr(torch, entry["dtype"]), device=device)
                dist.broadcast(sent, src=owner)
                if self.rank == 0:
                    whole.setdefault(index, {})[key] = value if owner == 0 else sent.cpu()
        return {**state_dict, "state": whole} if self.rank == 0 else state_dict

    def _state_layouts(self, state: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        """Every process's {weight index: {key: tensor shape and dtype, or the number}} of the state it holds,
        exchanged as JSON bytes (no pickle)."""
        mine = {str(i): {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                         if isinstance(v, torch.Tensor) else v for k, v in entries.items()}
                for i, entries in state.items()}
        encoded = torch.tensor(list(json.dumps(mine).encode()), dtype=torch.uint8)
        device = self.parameters[0].device
        length = torch.tensor([encoded.numel()], device=device)
        lengths = [torch.zeros_like(length) for _ in range(self.world)]
        dist.all_gather(lengths, length)
        longest = int(max(n.item() for n in lengths))
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[:encoded.numel()] = encoded.to(device)
        received = [torch.zeros_like(padded) for _ in range(self.world)]
        dist.all_gather(received, padded)
        return [json.loads(bytes(r[:int(n.item())].tolist()).decode()) for r, n in zip(received, lengths)]

    def _own_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """`load_state_dict`'s pre hook: keep the state of the weights this process owns."""
        owned = {index: entries for index, entries in state_dict["state"].items()
                 if self.owners[int(index)] == self.rank}
        return {**state_dict, "state": owned}
