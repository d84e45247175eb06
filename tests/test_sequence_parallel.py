"""Sequence parallelism (``--sp-degree``, Ulysses): the ranks of a group train one sample as one process would.

The transformer tests run `sp_worker.py` under torchrun (gloo, CPU): forward and backward of a tiny CogVideoX,
whole and then split over the ranks, for joint text + video lengths the degree does not divide. The run tests
launch cogtrain at --sp-degree 2 and compare losses and trained weights with one process (and DP2 x SP2 with
DP2); a checkpoint taken at SP=2 resumes at SP=1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cogtune.shared.errors import CogtuneError
from cogtune.train.sequence_parallel import Layout, SequenceParallel, check_degree, valid_degrees
from prep_helpers import encode
from train_helpers import LAUNCH_ENV, assert_close_runs, cogtrain, cogtrain_command, free_port, launch

WORKER = Path(__file__).with_name("sp_worker.py")
LORA = "pytorch_lora_weights.safetensors"
FULL = "transformer/diffusion_pytorch_model.safetensors"


def test_the_refused_degrees_name_the_valid_ones():
    assert valid_degrees(48, 8) == [1, 2, 4, 8]
    assert valid_degrees(30, 8) == [1, 2]  # CogVideoX-2b: 30 heads
    check_degree(4, 48, 8, "CogVideoX1.5-5B")
    with pytest.raises(CogtuneError, match=r"--sp-degree 3: must divide the 48 attention heads of CogVideoX1.5-5B "
                                           r"and the 8 processes .*valid degrees here: 1, 2, 4, 8$"):
        check_degree(3, 48, 8, "CogVideoX1.5-5B")
    with pytest.raises(CogtuneError, match=r"valid degrees here: 1, 2$"):
        check_degree(4, 30, 4, "CogVideoX-2b")


def test_the_layout_covers_the_sequence_once_with_the_padding_last():
    for text, video, degree in ((226, 45, 2), (226, 45, 4), (5, 3, 4), (226, 18, 8)):
        chunks = [Layout(text, video, degree, rank) for rank in range(degree)]
        assert len({c.chunk for c in chunks}) == 1
        texts = [i for c in chunks for i in range(text)[c.text_slice]]
        videos = [i for c in chunks for i in range(video)[c.video_slice]]
        assert texts == list(range(text)) and videos == list(range(video))
        assert sum(c.padding for c in chunks) == degree * chunks[0].chunk - text - video
        assert all(c.padding == 0 for c in chunks if c.end < text + video)  # padding only after the last token


def test_block_0_is_checkpointed_on_the_ranks_chunk_not_on_the_whole_sequence():
    """A checkpoint keeps its inputs to its backward, where block 0 recomputes from them: they must be this rank's
    chunk, split before the checkpoint and copied, not the whole video or a view of the joint sequence (which
    would keep every token alive). The last of 2 ranks over 2b's 226 + 45 tokens: 90 text, 45 video, 1 padding."""
    from cogtune.shared.variants import get_variant
    from cogtune.shared.zoo import TINY_TEXT_DIM, tiny_transformer_config
    from diffusers import CogVideoXTransformer3DModel

    config = {**tiny_transformer_config(get_variant("2b")), "num_attention_heads": 2}
    with torch.device("meta"):  # shapes only: the exchanges send nothing on the meta device
        model = CogVideoXTransformer3DModel(**config)
    checkpointed = []

    def checkpoint(block, hidden_states, encoder_hidden_states, *args):
        checkpointed.append((block, hidden_states, encoder_hidden_states))
        return block(hidden_states, encoder_hidden_states, *args)

    model.enable_gradient_checkpointing(checkpoint)
    model.train()
    parallel = SequenceParallel(degree=2, rank=1, dp_rank=0, dp_degree=1)
    parallel.attach(model)
    video = torch.empty(1, 3, config["in_channels"], 6, 10, device="meta")
    text = torch.empty(1, 226, TINY_TEXT_DIM, device="meta")
    with parallel.sharding():
        output = model(hidden_states=video, encoder_hidden_states=text, timestep=torch.tensor([10], device="meta"),
                       return_dict=False)[0]
    assert output.shape == (1, 3, config["out_channels"], 6, 10)  # gathered whole again
    block, hidden_states, encoder_hidden_states = checkpointed[0]
    assert block is model.transformer_blocks[0]
    assert (encoder_hidden_states.shape[1], hidden_states.shape[1]) == (90, 46)
    assert hidden_states._base is None and encoder_hidden_states._base is None
    # the other blocks get block 0's outputs: the chunk all along
    assert all(h.shape[1] == 46 and t.shape[1] == 90 for _, h, t in checkpointed)


def test_a_degree_the_launch_cannot_take_is_refused_before_anything_is_written(train_store, tiny_models, tmp_path):
    run = tmp_path / "run"
    result = cogtrain(train_store, tiny_models["5b"], run, "--sp-degree", "2", "--max-steps", "1", expect=2)
    assert "--sp-degree 2: must divide the 2 attention heads of CogVideoX-5b and the 1 processes" in result.output
    assert "valid degrees here: 1" in result.output
    assert not (run / "config.yaml").exists()
    cogtrain(train_store, tiny_models["5b"], tmp_path / "zero", "--sp-degree", "0", expect=2)


def run_worker(tmp_path: Path, processes: int, variant: str, frames: int, height: int, width: int, heads: int,
               checkpointing: bool) -> list[dict]:
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               str(free_port()), str(WORKER), str(out), variant, str(frames), str(height), str(width), str(heads),
               "1" if checkpointing else "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=LAUNCH_ENV)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(Path(f"{out}.rank{rank}").read_text()) for rank in range(processes)]


@pytest.mark.slow
@pytest.mark.parametrize(("processes", "variant", "frames", "height", "width", "heads", "checkpointing"), [
    (2, "5b", 3, 6, 10, 2, False),  # 226 + 45 tokens: rank 0 holds text only, rank 1 text, video and padding
    (2, "1.5-5b-i2v", 6, 6, 10, 2, True),  # ofs, frame patches of 2, the image channels; recomputed in backward
    (2, "2b", 3, 6, 10, 2, False),  # sincos position table added in the patch embedding
    (2, "5b-i2v", 3, 4, 6, 2, False),  # the learned position table, at its sample size
    (4, "1.5-5b", 6, 6, 10, 4, True),  # 271 tokens over 4 ranks: 68 each, one of padding
])
def test_the_split_transformer_gives_the_whole_ones_output_and_gradients(tmp_path, processes, variant, frames,
                                                                          height, width, heads, checkpointing):
    for result in run_worker(tmp_path, processes, variant, frames, height, width, heads, checkpointing):
        assert result["tokens"] == (244 if variant == "5b-i2v" else 271)
        assert result["output"] <= 1e-6 * result["output_scale"]
        assert result["loss"] <= 1e-7
        # gradients summed over the group against the single process's: float32 summation order only
        assert result["grad"] <= 1e-5 * result["grad_scale"]
        assert result["grads_missing"] == []


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "extra", "weights"), [
    ("lora", ("--caption-dropout", "0.5"), LORA),
    ("sft", ("--learning-rate", "1e-5", "--no-gradient-checkpointing", "--caption-dropout", "0.5"), FULL),
    ("lora", ("--base-weights", "fp8"), LORA),  # frozen weights stored in float8, computed in float32
])
def test_sp2_trains_as_one_process(train_store, tiny_models, tmp_path, mode, extra, weights):
    args = ("--mode", mode, "--max-steps", "3", *extra)
    one, split = tmp_path / "one", tmp_path / "split"
    launch(cogtrain_command(train_store, tiny_models["5b"], one, *args))
    launch(cogtrain_command(train_store, tiny_models["5b"], split, *args, "--sp-degree", "2", processes=2))
    assert_close_runs(split, one, weights)


@pytest.fixture(scope="module")
def odd_i2v_store(train_dataset, tiny_models, tmp_path_factory):
    """1.5-5B-I2V at 17x48x80: 3 frame patches of 3x5, 226 + 45 = 271 tokens, which 2 does not divide."""
    store = tmp_path_factory.mktemp("sp-i2v") / "store"
    encode(train_dataset, tiny_models["1.5-5b-i2v"], store, "--resolution", "17x48x80")
    return store


@pytest.mark.slow
def test_sp2_trains_an_i2v_model_on_an_odd_sequence_as_one_process(odd_i2v_store, tiny_models, tmp_path):
    args = ("--max-steps", "3", "--image-dropout", "0.5", "--caption-dropout", "0.3", "--offload-checkpoints")
    one, split = tmp_path / "one", tmp_path / "split"
    launch(cogtrain_command(odd_i2v_store, tiny_models["1.5-5b-i2v"], one, *args))
    launch(cogtrain_command(odd_i2v_store, tiny_models["1.5-5b-i2v"], split, *args, "--sp-degree", "2", processes=2))
    assert_close_runs(split, one, LORA)


@pytest.mark.slow
def test_dp2_sp2_trains_as_dp2(train_store, tiny_models, tmp_path):
    args = ("--max-steps", "2", "--caption-dropout", "0.5")
    dp, both = tmp_path / "dp", tmp_path / "both"
    launch(cogtrain_command(train_store, tiny_models["5b"], dp, *args, processes=2))
    launch(cogtrain_command(train_store, tiny_models["5b"], both, *args, "--sp-degree", "2", processes=4))
    assert_close_runs(both, dp, LORA)


@pytest.mark.slow
def test_a_checkpoint_taken_at_sp2_resumes_at_sp1(train_store, tiny_models, tmp_path):
    # a schedule that does not depend on --max-steps, and moves at steps 3 and 4 only if re-counted right
    args = ("--lr-scheduler", "constant_with_warmup", "--lr-warmup-steps", "4", "--checkpoint-every", "2",
            "--keep-checkpoints", "0", "--caption-dropout", "0.5")
    one, resumed = tmp_path / "one", tmp_path / "resumed"
    launch(cogtrain_command(train_store, tiny_models["5b"], one, *args, "--max-steps", "4"))
    launch(cogtrain_command(train_store, tiny_models["5b"], resumed, *args, "--max-steps", "2", "--sp-degree", "2",
                            processes=2))
    launch(cogtrain_command(train_store, tiny_models["5b"], resumed, *args, "--max-steps", "4", "--resume", "latest"))
    assert_close_runs(resumed, one, LORA)
    logged = [json.loads(line)["lr"] for line in (resumed / "losses.jsonl").read_text().splitlines()]
    expected = [json.loads(line)["lr"] for line in (one / "losses.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(expected)  # the schedule re-counted for one process


@pytest.mark.slow
def test_validation_and_the_held_out_loss_under_sp2_finish_without_a_hang(train_store, tiny_models, tmp_path):
    """Rank 0 generates the videos alone with the whole transformer (no exchange for the other rank to wait
    on); every rank computes its share of the held-out loss unsplit. `launch` fails on a hang (its timeout)."""
    run = tmp_path / "run"
    launch(cogtrain_command(train_store, tiny_models["5b"], run, "--max-steps", "2", "--validate-every", "1",
                            "--validation-inference-steps", "2", "--eval-holdout", "1", "--eval-every", "1",
                            "--sp-degree", "2", processes=2))
    assert sorted(p.name for p in (run / "validation").glob("step-*.mp4"))
    logged = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [1, 2] and all("eval_loss" in entry for entry in logged)


@pytest.mark.slow
def test_bench_train_counts_one_rank_of_each_degree_on_the_meta_device(tmp_path):
    script = Path(__file__).parents[1] / "scripts" / "bench_train.py"
    out = tmp_path / "sp.json"
    done = subprocess.run([sys.executable, str(script), "--arch", "5b", "--frames", "9", "--height", "240", "--width",
                           "368", "--dry-run", "--sp-degree", "1,2", "--json", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = json.loads(out.read_text())["sp_degrees"]
    assert (one["tokens"], one["tokens_per_rank"], two["tokens_per_rank"]) == (226 + 3 * 15 * 23, 1261, 631)
    kept = [run["meta_device_memory_gb"]["kept_by_the_forward_for_the_backward"] for run in (one, two)]
    assert 0.4 < kept[1] / kept[0] < 0.6  # activations per rank fall as 1 / N
    assert two["model_flops_per_step"] < 0.6 * one["model_flops_per_step"]
    table = [line.split() for line in done.stdout.splitlines() if line.split()[:2] == ["2", "631"]]
    assert table and table[0][2] == f"{kept[1]:.3f}"  # the readable table shows the figures --json wrote
