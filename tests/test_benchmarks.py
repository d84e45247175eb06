"""The benchmark scripts run end to end on a tiny setting and print what they measured (no figure is checked
against a target here: timings belong to the benchmarks, not to the suite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parents[1] / "scripts"


def _run(script: str, *argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(SCRIPTS / script), *argv], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_bench_train_measures_every_variant(tmp_path):
    result = tmp_path / "bench.json"
    done = _run("bench_train.py", "--frames", "9", "--height", "32", "--width", "48", "--steps", "2", "--warmup",
                "1", "--rounds", "1", "--json", str(result))
    printed = json.loads(done.stdout[done.stdout.index("\n{") + 1:])
    assert printed == json.loads(result.read_text())
    assert "cogtrain vs bare: median step time" in done.stdout  # the readable table
    for name in ("bare", "cogtrain", "baseline"):
        variant = printed["variants"][name]
        assert "skipped" not in variant, variant
        assert variant["steps"] == 2 and variant["median_s"] > 0
        assert variant["peak_memory_bytes"]["host_peak_anon_growth"] > 0
        assert all(loss == loss for loss in variant["final_losses"])  # finite, not NaN
    assert set(printed["pass"]) == {"time", "memory"}
    # cogtrain's steps report how long they waited for the prefetching loader; the other loops have no loader
    assert printed["variants"]["cogtrain"]["data_wait_median_s"] >= 0
    assert "data_wait_median_s" not in printed["variants"]["bare"]
    assert printed["settings"]["malloc_mmap_threshold"] == 2**20


@pytest.mark.slow
def test_bench_train_builds_the_real_5b_on_the_meta_device(tmp_path):
    done = _run("bench_train.py", "--arch", "5b", "--dry-run")
    counts = json.loads(done.stdout)
    # CogVideoX-5b's transformer as published: 5.57 B parameters; LoRA r128 on the attention projections
    assert 5.5e9 < counts["transformer_parameters"] < 5.6e9
    assert counts["trained_parameters"] == counts["parameters_with_grad_after_backward"] > 0
    assert counts["latents"] == [1, 16, 13, 60, 90]
    assert 4.6e9 < counts["text_encoder_parameters"] < 4.8e9  # T5-XXL's encoder
    # the counted peak holds the weights, gradients and AdamW state, and more: the step's activations
    memory, static = counts["meta_device_memory_gb"], counts["static_memory_gb"]["total_before_activations"]
    assert static < memory["peak"] < static + 2 * memory["kept_by_the_forward_for_the_backward"]
    # checkpointing keeps each of the 42 blocks' video-token input: 17,550 x 3072 bfloat16 values apiece
    assert memory["kept_by_the_forward_for_the_backward"] > 42 * 17550 * 3072 * 2 / 2**30

    offloaded = json.loads(_run("bench_train.py", "--arch", "5b", "--dry-run", "--offload-checkpoints").stdout)
    # those inputs wait in host memory instead, but the first block's: its memory is shared with the text tokens
    saved = 41 * 17550 * 3072 * 2 / 2**30
    kept, offloaded_kept = (m["meta_device_memory_gb"]["kept_by_the_forward_for_the_backward"]
                            for m in (counts, offloaded))
    assert saved - 0.01 < kept - offloaded_kept < saved + 0.01
    assert memory["peak"] - offloaded["meta_device_memory_gb"]["peak"] > saved * 0.8


@pytest.mark.slow
def test_bench_train_counts_i2v_fp8_and_8bit_adamw_on_the_meta_device(tmp_path):
    # the tiny model through the new modes: quick, and the same code as the real sizes
    tiny = ("--arch", "tiny", "--frames", "9", "--height", "32", "--width", "48", "--rank", "4", "--dry-run")
    plain, fp8 = tmp_path / "plain.json", tmp_path / "fp8.json"
    _run("bench_train.py", *tiny, "--json", str(plain))
    _run("bench_train.py", *tiny, "--base-weights", "fp8", "--offload-checkpoints", "--json", str(fp8))
    plain, fp8 = json.loads(plain.read_text()), json.loads(fp8.read_text())  # --json writes in the dry run too
    assert fp8["base_weights"] == "fp8" and fp8["offload_checkpoints"]
    # the frozen weights the casting stores in float8 count 1 byte an element instead of 2
    assert fp8["weights_bytes"] < plain["weights_bytes"]
    assert plain["model_flops_per_step"] == fp8["model_flops_per_step"] > 0
    sft = json.loads(_run("bench_train.py", *tiny, "--mode", "sft", "--optimizer", "adamw8bit").stdout)
    # bitsandbytes' state made on the meta device (its kernels need CUDA) for every trained weight
    assert sft["optimizer"] == "adamw8bit" and sft["trained_parameters"] == sft["parameters_with_grad_after_backward"]
    # at most float32 moments (8 bytes a parameter, twice the float32 weights): the tiny model's tensors are mostly
    # under bitsandbytes' 4,096 elements, which keep float32 state; the real ones get the uint8 moments (README)
    assert 0 < sft["optimizer_state_bytes"] <= 2 * sft["weights_bytes"]


@pytest.mark.slow
def test_bench_train_builds_every_release_on_the_meta_device():
    # the releases' configs build and take their native shape's step; 1.5-I2V pads 21 latent frames to 22
    counts = json.loads(_run("bench_train.py", "--arch", "1.5-5b-i2v", "--dry-run", "--frames", "17", "--height",
                             "96", "--width", "160").stdout)
    assert counts["variant"] == "CogVideoX1.5-5B-I2V" and 5.5e9 < counts["transformer_parameters"] < 5.6e9
    assert counts["tokens"] == 3 * 6 * 10 + 226  # (5 latent frames padded to 6) / 2 x 12/2 x 20/2, plus the text


@pytest.mark.slow
def test_gpu_check_rehearses_on_the_cpu(tmp_path):
    done = subprocess.run([str(SCRIPTS / "gpu_check.sh"), "--device", "cpu", "--arch", "tiny", "--limit", "2",
                           "--warmup", "1", "--steps", "1", "--skip-tests", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "median s/step" in done.stdout and "FSDP 1 process" in done.stdout  # the table and the checks
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [row["config"] for row in summary["rows"]] == ["tiny LoRA r8 9x32x48 fp8+offload", "tiny LoRA r8 9x32x48 plain"]
    for row in summary["rows"]:
        assert row["median_s"] > 0 and row["model_flops_per_step"] > 0, row


@pytest.mark.slow
def test_bench_prep_measures_every_stage(tmp_path):
    result = tmp_path / "bench.json"
    done = _run("bench_prep.py", "--clips", "2", "--frames", "9", "--height", "32", "--width", "48",
                "--noop-entries", "50", "--json-out", str(result))
    measured = json.loads(result.read_text())
    assert "wall / slower stage" in done.stdout  # the readable table
    for stage in ("a_full_encode_clips_per_s", "b_decode_only_clips_per_s", "c_encode_only_clips_per_s",
                  "c_pack_only_clips_per_s"):
        assert measured[stage] > 0, stage
    assert measured["d_wall_over_slower_stage"] > 0 and 0 < measured["e_noop_rerun_s"]
    sizes = measured["f_bytes_per_sample"]
    # the store really is smaller than the naive layout at real size, and gzip takes something off
    assert sizes["cogvideox_5b_ratio"] < sizes["cogvideox_5b_ratio_uncompressed"] < 1


@pytest.mark.slow
def test_bench_faults_measures_the_start_up_check_and_verify(tmp_path):
    result = tmp_path / "bench.json"
    done = _run("bench_faults.py", "--samples", "20000", "--shards", "20", "--verify-samples", "12", "--latent",
                "16x3x8x8", "--rounds", "1", "--json-out", str(result))
    measured = json.loads(result.read_text())
    assert "start-up shard check, 20,000 samples / 22 shards" in done.stdout  # 20 video + 2 text shards
    assert measured["a_startup_check"]["shards"] == 22 and measured["a_startup_check"]["check_s"] > 0
    verify = measured["b_verify"]
    assert verify["members"] == 24  # every latent and every caption read back, none found damaged
    assert verify["verify_mb_s"] > 0 and verify["plain_read_mb_s"] > 0 and verify["inflate_one_core_mb_s"] > 0
