"""Worker of tests/test_sequence_parallel.py, run under torchrun (gloo, CPU): one tiny CogVideoX transformer
forward and backward, whole on every rank and then sequence-parallel over all ranks; writes the largest
differences (output, loss, gradients summed over the group against the whole run's) to a JSON file per rank.

    python -m torch.distributed.run --nproc_per_node N tests/sp_worker.py OUT.json VARIANT FRAMES HEIGHT WIDTH
        HEADS CHECKPOINTING
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from cogtune.shared.variants import get_variant
from cogtune.shared.zoo import TINY_TEXT_DIM, tiny_transformer_config
from cogtune.train.math import ofs_tensor, rotary_embeddings
from cogtune.train.sequence_parallel import SequenceParallel
from diffusers import CogVideoXTransformer3DModel


def main(out: str, slug: str, frames: int, height: int, width: int, heads: int, checkpointing: bool) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    variant = get_variant(slug)
    config = {**tiny_transformer_config(variant), "num_attention_heads": heads}
    if variant.positional == "learned":  # its table is made for the sample size only
        config.update(sample_height=height, sample_width=width)
    generator = torch.Generator().manual_seed(1)
    batch = 2
    hidden = torch.randn(batch, frames, config["in_channels"], height, width, generator=generator)
    text = torch.randn(batch, variant.text_length, TINY_TEXT_DIM, generator=generator)
    timestep = torch.tensor([10, 900])
    target = torch.randn(batch, frames, config["out_channels"], height, width, generator=generator)
    inputs = dict(hidden_states=hidden, encoder_hidden_states=text, timestep=timestep,
                  ofs=ofs_tensor(config, batch, "cpu", torch.float32),
                  image_rotary_emb=rotary_embeddings(config, height, width, frames, "cpu"), return_dict=False)

    def run(parallel: SequenceParallel | None):
        torch.manual_seed(0)
        model = CogVideoXTransformer3DModel(**config)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        if parallel is not None:
            parallel.attach(model)
        with parallel.sharding() if parallel is not None else torch.enable_grad():
            output = model(**inputs)[0]
            loss = F.mse_loss(output, target)
            loss.backward()
        return output.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    whole_output, whole_loss, whole_grads = run(None)
    parallel = SequenceParallel(degree=world, rank=rank, dp_rank=0, dp_degree=1, group=dist.group.WORLD)
    output, loss, grads = run(parallel)
    for grad in grads.values():  # what DDP's all-reduce adds up
        dist.all_reduce(grad)
    tokens = variant.text_length + frames // (variant.patch_size_t or 1) * (height // 2) * (width // 2)
    result = {
        "tokens": tokens,
        "output": (output - whole_output).abs().max().item(),
        "output_scale": whole_output.abs().max().item(),
        "loss": abs(loss.item() - whole_loss.item()),
        "grad": max((grads[n] - g).abs().max().item() for n, g in whole_grads.items()),
        "grad_scale": max(g.abs().max().item() for g in whole_grads.values()),
        "grads_missing": [n for n, g in grads.items() if g is None],
    }
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    path, slug, *numbers, checkpointing = sys.argv[1:]
    main(path, slug, *map(int, numbers), checkpointing == "1")
