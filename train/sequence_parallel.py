"""Sequence parallelism (Ulysses) for the CogVideoX transformer: ``cogtrain run --sp-degree N``.

The launch's W processes form W / N sequence-parallel groups of N consecutive ranks. The ranks of a group train
one batch together: each holds 1/N of the joint text + video token sequence through every transformer block,
and attention swaps sequence shards for head shards (all-to-all) so that each rank attends over every token for
1/N of the heads, then swaps back (DeepSpeed-Ulysses, arXiv:2309.14509). Groups are data-parallel to each other.

Exactness, against one process running diffusers' own ``CogVideoXTransformer3DModel.forward``:

- The joint sequence is the pipelines' own: all 226 text tokens, then the video tokens. It is cut into N
  contiguous chunks of ``ceil(S / N)`` tokens; the last chunk is padded with zeros to that length so that the
  all-to-all exchanges equal shapes. After the exchange the padding sits at the end of the gathered sequence and
  is cut off before attention; the blocks' other layers (norms, feed-forward, modulation) work token by token,
  so a padding token changes no other token; the output gather drops it before the loss.
- The patch embedding (sincos or learned position tables, the I2V channel concatenation) and the time and ofs
  embeddings run on the whole input on every rank, as in diffusers; each rank then keeps its chunk. Rotary
  tables are the pipelines' whole-clip tables, each rank applying the rows of its own video tokens.
- Gradients: each rank's backward carries the share of the loss's gradient that flows through its own tokens
  (the output gather hands each rank the gradient of its chunk only), so a group's gradients sum to the
  gradient of the single-process run. DDP averages over all W ranks; the loss is scaled by N for backward
  (`SequenceParallel.loss_scale`) so that the average is the mean over groups, each counted once.

diffusers 0.42 has Ulysses attention (``ContextParallelConfig``, ``attention_dispatch.TemplatedUlyssesAttention``)
but it does not fit here: it needs sequence shards of equal length, so the padding of an uneven split would be
attended to; its variant for uneven lengths (``ulysses_anything``) has no backward pass; and its ``_cp_plan``
hooks split each model input on its own, where CogVideoX joins text and video inside the patch embedding and
its attention processor applies rotary embeddings to the video part of the joint sequence. So this module has
its own all-to-all (`_HeadsToSequence`, with the inverse exchange as its backward) and a CogVideoX processor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..shared.errors import CogtuneError


def valid_degrees(heads: int, world: int) -> list[int]:
    """The --sp-degree values a model with `heads` attention heads can use on `world` processes."""
    return [n for n in range(1, min(heads, world) + 1) if heads % n == 0 and world % n == 0]


def check_degree(degree: int, heads: int, world: int, model: str) -> None:
    """Refuse a degree that does not divide the heads (each rank attends with heads / N) or the processes."""
    if degree == 1 or degree in valid_degrees(heads, world):
        return
    valid = ", ".join(map(str, valid_degrees(heads, world)))
    raise CogtuneError(f"--sp-degree {degree}: must divide the {heads} attention heads of {model} and the {world} "
                       f"processes of this launch; valid degrees here: {valid}")


@dataclass(frozen=True)
class Layout:
    """Where one rank's chunk of the joint sequence (`text` tokens, then `video` tokens) lies."""

    text: int
    video: int
    degree: int
    rank: int

    @property
    def chunk(self) -> int:
        """Tokens per rank, padding included: ceil(S / N)."""
        return -(-(self.text + self.video) // self.degree)

    @property
    def start(self) -> int:
        return min(self.rank * self.chunk, self.text + self.video)

    @property
    def end(self) -> int:
        return min(self.start + self.chunk, self.text + self.video)

    @property
    def text_slice(self) -> slice:
        return slice(min(self.start, self.text), min(self.end, self.text))

    @property
    def video_slice(self) -> slice:
        """This rank's video tokens, as positions in the video sequence (and rows of the rotary tables)."""
        return slice(max(self.start, self.text) - self.text, max(self.end, self.text) - self.text)

    @property
    def local_text(self) -> int:
        return self.text_slice.stop - self.text_slice.start

    @property
    def padding(self) -> int:
        return self.chunk - (self.end - self.start)


class _HeadsToSequence(torch.autograd.Function):
    """All-to-all [B, H, c, d] (all heads, this rank's c tokens) -> [B, H/N, N*c, d] (its heads, every token);
    `inverse` runs the opposite exchange. Each is the other's backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, degree: int, inverse: bool) -> torch.Tensor:
        ctx.group, ctx.degree, ctx.inverse = group, degree, inverse
        return _exchange(x, group, degree, inverse)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad.contiguous(), ctx.group, ctx.degree, not ctx.inverse), None, None, None


def _all_to_all(send: torch.Tensor, group) -> torch.Tensor:
    """Block j of `send` [N, ...] to rank j; returns the blocks received, rank j's at j. On the meta device
    (scripts/bench_train.py --dry-run counts one rank's memory) nothing is sent: the buffer a rank would get."""
    received = torch.empty_like(send)
    if send.device.type != "meta":
        dist.all_to_all_single(received, send, group=group)
    return received


def _exchange(x: torch.Tensor, group, n: int, inverse: bool) -> torch.Tensor:
    if not inverse:  # [B, H, c, d]: send head group j to rank j
        b, h, c, d = x.shape
        received = _all_to_all(x.reshape(b, n, h // n, c, d).transpose(0, 1).contiguous(), group)
        # received[j]: rank j's c tokens for this rank's heads, in rank order: the sequence in order
        return received.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * c, d)
    b, h_local, s, d = x.shape  # [B, H/N, N*c, d]: send tokens of chunk j back to rank j
    received = _all_to_all(x.reshape(b, h_local, n, s // n, d).permute(2, 0, 1, 3, 4).contiguous(), group)
    # received[j]: this rank's tokens for rank j's head group, the heads in order
    return received.transpose(0, 1).reshape(b, n * h_local, s // n, d)


class _GatherVideo(torch.autograd.Function):
    """[B, local video tokens + padding, X] on each rank -> [B, video, X], the whole video on every rank.

    Every rank computes the same loss from the gathered output; the backward hands each rank the gradient of
    its own tokens only, with no reduction, so that the group's gradients sum to the single-process one.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, layout: Layout, group) -> torch.Tensor:
        ctx.layout = layout
        # text positions of the chunk as zeros: every rank then sends the same [B, c, X]
        chunk = torch.cat([local.new_zeros(local.shape[0], layout.local_text, local.shape[2]), local], dim=1)
        pieces = [torch.empty_like(chunk) for _ in range(layout.degree)]
        if chunk.device.type != "meta":  # see _all_to_all
            dist.all_gather(pieces, chunk.contiguous(), group=group)
        return torch.cat(pieces, dim=1)[:, layout.text:layout.text + layout.video]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layout = ctx.layout
        whole = F.pad(grad, (0, 0, layout.text, layout.degree * layout.chunk - layout.text - layout.video))
        mine = whole[:, layout.rank * layout.chunk:(layout.rank + 1) * layout.chunk]
        return mine[:, layout.local_text:], None, None


class UlyssesAttnProcessor:
    """``CogVideoXAttnProcessor2_0`` (diffusers attention_processor.py) on a chunk of the joint sequence: the same
    projections, qk norms and rotary embedding, with the all-to-all around attention. Outside a sharded step
    (validation, the held-out loss) it hands over to the processor it replaced."""

    def __init__(self, parallel: SequenceParallel, original: Any):
        self.parallel = parallel
        self.original = original

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        layout = self.parallel.layout
        if layout is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:  # CogVideoX's pipelines never pass one
            raise ValueError("sequence-parallel CogVideoX attention takes no attention mask")
        text = encoder_hidden_states.size(1)
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, heads = joint.shape[0], attn.heads
        query, key, value = (projection(joint).unflatten(2, (heads, -1)).transpose(1, 2)
                             for projection in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = _rotate_video(query, image_rotary_emb, layout, text)
            if not attn.is_cross_attention:
                key = _rotate_video(key, image_rotary_emb, layout, text)
        tokens = layout.text + layout.video
        group = self.parallel.group
        # the padding is at the end of the exchanged sequence: cut it off, attention never sees it
        degree = layout.degree
        query, key, value = (_HeadsToSequence.apply(x, group, degree, False)[:, :, :tokens]
                             for x in (query, key, value))
        attended = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        attended = F.pad(attended, (0, 0, 0, degree * layout.chunk - tokens))
        attended = _HeadsToSequence.apply(attended, group, degree, True)
        attended = attended.transpose(1, 2).reshape(batch, -1, heads * attended.shape[-1])
        attended = attn.to_out[1](attn.to_out[0](attended))
        encoder_hidden_states, hidden_states = attended.split([text, attended.size(1) - text], dim=1)
        return hidden_states, encoder_hidden_states


def _rotate_video(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], layout: Layout,
                  text: int) -> torch.Tensor:
    """Apply the rows of the whole-clip rotary tables that belong to this rank's video tokens [B, H, c, d]."""
    from diffusers.models.embeddings import apply_rotary_emb

    rows = layout.video_slice
    count = rows.stop - rows.start
    if count == 0:  # a chunk of text only (apply_rotary_emb cannot reshape an empty tensor)
        return x
    cos, sin = rotary
    rotated = apply_rotary_emb(x[:, :, text:text + count], (cos[rows], sin[rows]))
    return torch.cat([x[:, :, :text], rotated, x[:, :, text + count:]], dim=2)


@dataclass
class SequenceParallel:
    """This rank's place in the launch: its sequence-parallel group and its data-parallel rank."""

    degree: int
    """--sp-degree: ranks per group."""
    rank: int
    """Rank within the group."""
    dp_rank: int
    """Which group: the rank the data sampler and the noise draws see."""
    dp_degree: int
    """Number of groups: the world the data sampler sees."""
    group: Any = None
    """The group's process group (None at degree 1)."""
    layout: Layout | None = None
    """The chunk of the step in flight; None outside `sharding` (the transformer then runs whole)."""
    active: bool = False

    @classmethod
    def unsplit(cls, accelerator) -> SequenceParallel:
        """No sequence parallelism: every process is a group of one, its data-parallel rank its own."""
        return cls(degree=1, rank=0, dp_rank=accelerator.process_index, dp_degree=accelerator.num_processes)

    @classmethod
    def setup(cls, degree: int, accelerator, heads: int, model: str) -> SequenceParallel:
        """Check `degree`, then make the groups: ranks [g*N, (g+1)*N) are group g (every rank makes every group,
        in the same order, as torch.distributed requires)."""
        world, rank = accelerator.num_processes, accelerator.process_index
        check_degree(degree, heads, world, model)
        if degree == 1:
            return cls.unsplit(accelerator)
        from accelerate.utils import DistributedType

        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise CogtuneError(f"--sp-degree {degree}: plain data parallelism (DDP) only, not FSDP or DeepSpeed")
        groups = [dist.new_group(list(range(g * degree, (g + 1) * degree))) for g in range(world // degree)]
        return cls(degree=degree, rank=rank % degree, dp_rank=rank // degree, dp_degree=world // degree,
                   group=groups[rank // degree])

    @property
    def loss_scale(self) -> float:
        """Factor on the loss for backward: DDP divides by all W ranks, the groups' gradients are N-way sums."""
        return float(self.degree)

    def attach(self, transformer: torch.nn.Module) -> None:
        """Give the transformer its sharded path: the split before the first block, the Ulysses processor in every
        block, the gather after the output projection. Parameter names and the state dict are unchanged."""
        if self.degree == 1:
            return
        for block in transformer.transformer_blocks:
            block.attn1.set_processor(UlyssesAttnProcessor(self, block.attn1.processor))
        transformer.transformer_blocks[0].register_forward_pre_hook(self._split, with_kwargs=True)
        transformer.proj_out.register_forward_hook(self._gather)
        if getattr(transformer, "gradient_checkpointing", False):
            transformer._gradient_checkpointing_func = self._split_before(transformer.transformer_blocks[0],
                                                                          transformer._gradient_checkpointing_func)

    def _split_before(self, first: torch.nn.Module, checkpoint: Any) -> Any:
        """Under gradient checkpointing, split block 0's inputs before its checkpoint, not inside it: a checkpoint
        keeps its inputs until its backward and block 0's recompute runs from them, so split inside, each rank
        would keep the whole joint sequence to the end of the step and rebuild the whole video for the recompute
        (0.5 GiB at CogVideoX 1.5's 45,106 tokens). The same slices and padding, so the same values and
        gradients."""

        def split_then_checkpoint(block, hidden_states, encoder_hidden_states, *args):
            if self.active and block is first:
                hidden_states, encoder_hidden_states = self._chunks(hidden_states, encoder_hidden_states)
            return checkpoint(block, hidden_states, encoder_hidden_states, *args)

        return split_then_checkpoint

    @contextlib.contextmanager
    def sharding(self) -> Iterator[None]:
        """Forward and backward of one training step, sharded (a checkpointed block recomputes in backward)."""
        self.active = self.degree > 1
        try:
            yield
        finally:
            self.active, self.layout = False, None

    def _split(self, block, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Block 0's inputs, the whole text [B, T, D] and video [B, V, D], -> this rank's chunk of each (the video
        part padded). Called positionally under gradient checkpointing, by keyword otherwise."""
        if not self.active or self.layout is not None:  # split already (`_split_before`)
            return args, kwargs
        names = ("hidden_states", "encoder_hidden_states")
        values = {name: args[i] if len(args) > i else kwargs[name] for i, name in enumerate(names)}
        local_video, local_text = self._chunks(values["hidden_states"], values["encoder_hidden_states"])
        chunks = {"hidden_states": local_video, "encoder_hidden_states": local_text}
        args = tuple(chunks[names[i]] if i < 2 else a for i, a in enumerate(args))
        kwargs = {k: chunks.get(k, v) for k, v in kwargs.items()}
        return args, kwargs

    def _chunks(self, video: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole video [B, V, D] and text [B, T, D] -> this rank's chunk of each (the video part padded), and
        the step's layout set. Copies, not views: both come from one joint tensor of every token, which a view
        would keep alive."""
        self.layout = layout = Layout(text.shape[1], video.shape[1], self.degree, self.rank)
        local_video = F.pad(video[:, layout.video_slice], (0, 0, 0, layout.padding))  # a copy, even padding nothing
        return local_video, text[:, layout.text_slice].clone()

    def _gather(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        if self.layout is None:
            return output
        return _GatherVideo.apply(output, self.layout, self.group)
