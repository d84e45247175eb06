"""``--compile``: torch.compile (inductor) of each transformer block, with a count of the compiles.

Only the blocks are compiled, the regional compilation of diffusers' ``compile_repeated_blocks``: the 30 to 42
blocks of a CogVideoX share one class, so one compiled graph serves them all and compiling takes a block's
time, not the whole model's. diffusers cannot do it for CogVideoX itself: ``CogVideoXTransformer3DModel`` leaves
``_repeated_blocks`` empty, so its ``compile_repeated_blocks`` refuses; compiling each of
``transformer_blocks`` in place (``Module.compile``) is what it would do. In place, the module names stay as
they were: checkpoints, the LoRA file and validation see the same model.

What runs around a block stays eager: gradient checkpointing (plain or ``--offload-checkpoints``) calls the
compiled block in the forward pass and again in the backward recompute, the LoRA layers inside a block are
traced with it, and the patch embedding, rotary tables and output projection run as before.

Shapes are compiled dynamic (``dynamic=True``): a bucket's frames, height and width set the token count, and
without it a new bucket shape would compile the blocks anew. What dynamo still compiles apart (measured on the
tiny 5b): a batch of one apart from larger batches (it specializes size 1), the first block apart from the rest
(its input needs no gradient), with ``--offload-checkpoints`` the first block's recompute (its input comes back as
a copy, where the forward pass gave it a slice of the patch embedding's output), and the no-grad calls of
validation. A handful in a run (4 for training alone, 8 with the offload and validation), whatever its length and
number of buckets.

The count: a `CompileCounter` is the backend torch.compile hands each captured graph to, and it passes the graph on
to inductor. It counts dynamo's compile ids (frame, n-th compile of that frame), not its calls: dynamo may trace a
frame again and call the backend a second time for the same compile (a "restart analysis", e.g. when it turns a
Python float into a tensor), which is one compile, not two. It counts this process's compiles of these blocks
only, whatever dynamo's process-wide counters hold.
"""

from __future__ import annotations

from typing import Any

import torch


class CompileCounter:
    """A torch.compile backend: inductor, counting dynamo's compiles."""

    def __init__(self) -> None:
        self._compile_ids: set[Any] = set()
        self._inductor = torch._dynamo.lookup_backend("inductor")

    @property
    def compiles(self) -> int:
        """Compiles so far: first compiles and recompiles."""
        return len(self._compile_ids)

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Any]):
        self._compile_ids.add(torch._guards.CompileContext.current_compile_id())
        return self._inductor(graph, example_inputs)


def compile_blocks(transformer: torch.nn.Module) -> CompileCounter:
    """Compile each of `transformer`'s blocks in place (compiled at their first call); returns the counter."""
    counter = CompileCounter()
    # the variants above reach dynamo's default limit of 8 per frame with validation and the offload, and the
    # held-out loss's no-grad calls add to them; past the limit a block would run eager, slow without a word
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    for block in transformer.transformer_blocks:
        block.compile(backend=counter, dynamic=True)
    return counter
