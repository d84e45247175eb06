"""--shard-optimizer (ZeRO-2): gradients and AdamW state sharded over the processes, training as DDP does.

The unit tests run two gloo processes (torch.multiprocessing) on a small model: the sharded optimizer against
DDP's arithmetic written out (average every gradient over the processes, clip the whole norm, AdamW on every
weight), its checkpoint state against the unsharded optimizer's, and a resume. The run tests launch cogtrain.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cogtune.train.optimizer_sharding import OptimizerSharding, assign_owners
from train_helpers import assert_close_runs, cogtrain, cogtrain_command, free_port, launch

STEPS, MICRO = 3, 2
LORA = "pytorch_lora_weights.safetensors"
FULL = "transformer/diffusion_pytorch_model.safetensors"


def test_owners_balance_the_elements_and_agree_everywhere():
    sizes = [4096, 64, 4096, 64, 1024, 1024, 7]
    owners = assign_owners(sizes, 2)
    loads = [sum(s for s, o in zip(sizes, owners) if o == rank) for rank in range(2)]
    assert sorted(loads) == [5184, 5191]  # the largest first, each to the lighter process
    assert assign_owners(sizes, 2) == owners  # a pure function of the sizes: every process gets the same answer
    assert assign_owners(sizes, 1) == [0] * len(sizes)
    assert set(assign_owners(sizes, 8)) == set(range(7))  # 7 weights over 8 processes: one each, one left without


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 16), torch.nn.GELU(),
                               torch.nn.Linear(16, 3))


def batch(rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randn(5, 6, generator=generator), torch.randn(5, 3, generator=generator)


def loss_of(model: torch.nn.Module, rank: int, step: int, micro: int) -> torch.Tensor:
    inputs, target = batch(rank, step, micro)
    return torch.nn.functional.mse_loss(model(inputs), target) / MICRO


def ddp_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: int, first: int, last: int,
              max_norm: float) -> list[float]:
    """DDP's arithmetic by hand: each process's gradients averaged over the processes, the whole norm clipped."""
    norms = []
    for step in range(first, last):
        for micro in range(MICRO):
            loss_of(model, dist.get_rank(), step, micro).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def sharded_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharding: OptimizerSharding,
                  first: int, last: int, max_norm: float) -> list[float]:
    norms = []
    for step in range(first, last):
        for micro in range(MICRO):
            loss_of(model, dist.get_rank(), step, micro).backward()
            sharding.finish_backward()
        norms.append(float(sharding.clip_grad_norm_(max_norm)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    max_norm = 0.05  # small enough that every step clips: the norm must be the one over all processes
    reference = make_model(0)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    reference_norms = ddp_steps(reference, reference_optimizer, world, 0, STEPS, max_norm)

    model = make_model(rank)  # other weights on rank 1: the sharding starts every process from rank 0's
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sharding = OptimizerSharding(optimizer, rank, world)
    norms = sharded_steps(model, optimizer, sharding, 0, STEPS, max_norm)
    weights_error = max(float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), reference.parameters()))
    params = list(model.parameters())
    owned_state = [i for i, p in enumerate(params) if p in optimizer.state]  # the state each process holds
    saved = optimizer.state_dict()  # process 0: the whole state, in the unsharded layout
    whole = reference_optimizer.state_dict()
    # process 0's gathered state against the unsharded optimizer's: the same weights, keys and values
    state_keys = sorted((i, sorted(v)) for i, v in saved["state"].items())
    state_error = max(float((saved["state"][i][k].cpu().float() - whole["state"][i][k].float()).abs().max())
                      for i in whole["state"] for k in whole["state"][i]) if rank == 0 else 0.0

    # resume: a fresh model and sharded optimizer load process 0's checkpoint and go on as DDP does
    resumed = make_model(5)
    resumed.load_state_dict(model.state_dict())
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.1)
    resumed_sharding = OptimizerSharding(resumed_optimizer, rank, world)
    if rank == 0:  # as accelerate saves it: process 0 writes, every process loads
        torch.save(saved, f"{out}.optimizer.bin")
    dist.barrier()
    resumed_optimizer.load_state_dict(torch.load(f"{out}.optimizer.bin", weights_only=True))
    kept = [i for i, p in enumerate(resumed.parameters()) if p in resumed_optimizer.state]
    resumed_norms = sharded_steps(resumed, resumed_optimizer, resumed_sharding, STEPS, STEPS + 2, max_norm)
    reference_resumed = ddp_steps(reference, reference_optimizer, world, STEPS, STEPS + 2, max_norm)
    result = {
        "norms": norms, "reference_norms": reference_norms,
        "weights_error": weights_error,
        "resumed_norms": resumed_norms, "reference_resumed_norms": reference_resumed,
        "resumed_error": max(float((a - b).detach().abs().max())
                             for a, b in zip(resumed.parameters(), reference.parameters())),
        "owned": [i for i, p in enumerate(model.parameters()) if sharding.owned(p)],
        "owned_state": owned_state, "kept_after_load": kept,
        "state_keys": state_keys, "reference_state_keys": sorted((i, sorted(v)) for i, v in whole["state"].items()),
        "state_error": state_error,
    }
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_two_processes_train_as_ddp_and_checkpoint_the_whole_state(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(worker, args=(2, free_port(), out), nprocs=2, join=True)
    results = [json.loads(open(f"{out}.{rank}").read()) for rank in range(2)]
    for result in results:
        assert result["norms"] == pytest.approx(result["reference_norms"], rel=1e-5)
        assert min(result["norms"]) > 0.05  # every step clipped
        assert result["weights_error"] < 1e-6
        assert result["resumed_norms"] == pytest.approx(result["reference_resumed_norms"], rel=1e-5)
        assert result["resumed_error"] < 1e-6
        assert result["owned_state"] == result["owned"] == result["kept_after_load"]
    assert sorted(results[0]["owned"] + results[1]["owned"]) == list(range(6))  # each weight owned once
    assert results[0]["state_keys"] == results[0]["reference_state_keys"]
    assert [key for _, key in results[0]["state_keys"]] == [["exp_avg", "exp_avg_sq", "step"]] * 6
    assert results[0]["state_error"] < 1e-7


SP_ARGS = ("--base-weights", "fp8", "--offload-checkpoints", "--gradient-accumulation-steps", "2",
           "--caption-dropout", "0.5", "--lr-scheduler", "constant_with_warmup", "--lr-warmup-steps", "4",
           "--checkpoint-every", "2", "--keep-checkpoints", "0")
"""The setting of the 8 GiB target (float8 base weights, offloaded checkpoints), with accumulation, dropout
and a schedule that moves at every step."""


@pytest.mark.slow
def test_sharded_sp2_trains_as_one_process_and_resumes_unsharded_and_back(train_store, tiny_models, tmp_path):
    """Steps 1-2 sharded at SP2, step 3 on one process without sharding, step 4 sharded at SP2 again: the same
    losses, learning rates and weights as four steps on one process. The checkpoint of step 2 holds the whole
    optimizer state (one process resumes from it), and step 3's is split again between two owners."""
    model = tiny_models["5b"]
    one, chained = tmp_path / "one", tmp_path / "chained"
    launch(cogtrain_command(train_store, model, one, *SP_ARGS, "--max-steps", "4"))
    sharded = ("--shard-optimizer", "--sp-degree", "2")
    launch(cogtrain_command(train_store, model, chained, *SP_ARGS, "--max-steps", "2", *sharded, processes=2))
    launch(cogtrain_command(train_store, model, chained, *SP_ARGS, "--max-steps", "3", "--resume", "latest"))
    launch(cogtrain_command(train_store, model, chained, *SP_ARGS, "--max-steps", "4", "--resume", "latest",
                            *sharded, processes=2))
    assert_close_runs(chained, one, LORA)
    lrs = [[json.loads(line)["lr"] for line in (run / "losses.jsonl").read_text().splitlines()]
           for run in (chained, one)]
    assert lrs[0] == pytest.approx(lrs[1])


@pytest.mark.slow
def test_sharded_dp2_full_fine_tune_trains_as_ddp(train_store, tiny_models, tmp_path):
    """Two data-parallel processes on different batches: every weight of the transformer sharded, summed over
    both and averaged as DDP averages, with accumulation."""
    args = ("--mode", "sft", "--learning-rate", "1e-5", "--no-gradient-checkpointing", "--max-steps", "2",
            "--gradient-accumulation-steps", "2")
    ddp, sharded = tmp_path / "ddp", tmp_path / "sharded"
    launch(cogtrain_command(train_store, tiny_models["5b"], ddp, *args, processes=2))
    launch(cogtrain_command(train_store, tiny_models["5b"], sharded, *args, "--shard-optimizer", processes=2))
    assert_close_runs(sharded, ddp, FULL)


@pytest.mark.parametrize(("extra", "message"), [
    (("--optimizer", "prodigy"), "--shard-optimizer: not with --optimizer prodigy"),
    (("--mixed-precision", "fp16"), "--shard-optimizer: not with --mixed-precision fp16"),
    (("--compile",), "--shard-optimizer: not with --compile"),
])
def test_what_sharding_cannot_take_is_refused_in_one_line(train_store, tiny_models, tmp_path, extra, message):
    run = tmp_path / "run"
    result = cogtrain(train_store, tiny_models["5b"], run, "--shard-optimizer", *extra, expect=2)
    assert message in result.output
    assert not run.exists()


@pytest.mark.slow
def test_bench_train_counts_the_owners_share_of_gradients_and_state(tmp_path):
    """The dry run with the real sharding on the meta device: at 2 processes the heaviest owner holds about
    half the gradients and AdamW state of one process, and its peak falls by at least what that saves."""
    script = Path(__file__).parents[1] / "scripts" / "bench_train.py"
    out = tmp_path / "counts.json"
    done = subprocess.run([sys.executable, str(script), "--arch", "tiny", "--dry-run", "--sp-degree", "1,2",
                           "--shard-optimizer", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = json.loads(out.read_text())["sp_degrees"]
    assert one["gradient_bytes"] == one["trained_parameters"] * 4  # one process owns every float32 gradient
    for run in (one, two):  # AdamW: two moments a weight, and a 4-byte step count a tensor
        assert 0 < run["optimizer_state_bytes"] - 2 * run["gradient_bytes"] < 4 * 1000
    assert 0.5 <= two["gradient_bytes"] / one["gradient_bytes"] < 0.6
    assert two["parameters_with_grad_after_backward"] * 4 == two["gradient_bytes"]
    assert "gradients and optimizer state sharded" in done.stdout
