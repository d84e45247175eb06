"""The benchmark scripts run end to end on a tiny setting and print what they measured (no figure is checked
against a target here: timings belong to the benchmarks, not to the suite)."""

from __future__ import annotations

import json
import math
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
    printed = json.loads(result.read_text())
    rows = [line.split() for line in done.stdout.splitlines()]
    table = {row[0]: row for row in rows  # a variant's row: its name, then its figures
             if row[:1] in (["bare"], ["cogtrain"], ["baseline"]) and row[1].replace(".", "").isdigit()}
    for name in ("bare", "cogtrain", "baseline"):
        variant = printed["variants"][name]
        assert "skipped" not in variant, variant
        assert variant["steps"] == 2 and 0 < variant["min_s"] <= variant["median_s"]
        assert variant["round_medians_s"] == [variant["median_s"]]  # one round: its median is the median
        assert variant["peak_memory_bytes"]["host_peak_anon_growth"] > 0
        assert all(math.isfinite(loss) for loss in variant["final_losses"])
        # the readable table shows the figures --json wrote: median, mean and min step time, the ratio to bare
        assert table[name][1:5] == [f"{variant[k]:.4f}" for k in ("median_s", "mean_s", "min_s")] + [
            f"{variant['median_s'] / printed['variants']['bare']['median_s']:.3f}"]
    # the verdicts are the ratios of the figures against the targets
    cogtrain, bare, targets = printed["variants"]["cogtrain"], printed["variants"]["bare"], printed["targets"]
    memory = "host_peak_anon_growth"
    assert cogtrain["time_ratio"] == cogtrain["median_s"] / bare["median_s"]
    assert cogtrain["memory_ratio"] == cogtrain["peak_memory_bytes"][memory] / bare["peak_memory_bytes"][memory]
    assert printed["pass"] == {"time": cogtrain["time_ratio"] <= targets["time_ratio"],
                               "memory": cogtrain["memory_ratio"] <= targets["memory_ratio"]}
    verdict = f"cogtrain vs bare: median step time {cogtrain['time_ratio']:.3f}x (target <= {targets['time_ratio']}): "
    assert verdict + ("PASS" if printed["pass"]["time"] else "FAIL") in done.stdout
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
def test_bench_train_counts_i2v_fp8_and_8bit_adamw_on_the_meta_device(gpu_check_rehearsal):
    # the tiny model through the new modes: quick, and the same code as the real sizes. gpu_check's rehearsal has
    # already run `bench_train.py --arch tiny --frames 9 --height 32 --width 48 --rank 8 --dry-run --json FILE`
    # with --base-weights fp8 --offload-checkpoints (its first row) and without (its second): read those files
    _, out = gpu_check_rehearsal
    fp8, plain = (json.loads((out / f"meta-{index}.json").read_text()) for index in (0, 1))  # --json in a dry run
    assert plain["base_weights"] != "fp8" and not plain["offload_checkpoints"]
    assert fp8["base_weights"] == "fp8" and fp8["offload_checkpoints"]
    # the frozen weights the casting stores in float8 count 1 byte an element instead of 2
    assert fp8["weights_bytes"] < plain["weights_bytes"]
    assert plain["model_flops_per_step"] == fp8["model_flops_per_step"] > 0
    tiny = ("--arch", "tiny", "--frames", "9", "--height", "32", "--width", "48", "--rank", "4", "--dry-run")
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


@pytest.fixture(scope="module")
def gpu_check_rehearsal(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """scripts/gpu_check.sh on the CPU at the tiny sizes, run once for the module: (the finished process, its --out
    folder). Its real-size prep row is `bench_prep.py real-size` in a process of its own, whose JSON and output
    the folder keeps (prep.json, prep.log): the real-size prep test reads that run rather than building the real
    VAE and T5-XXL layers a second time."""
    out = tmp_path_factory.mktemp("gpu-check")
    # a budget for a shared 2-core machine: its default (480 s, for a GPU) is not what this rehearses
    done = subprocess.run([str(SCRIPTS / "gpu_check.sh"), "--device", "cpu", "--arch", "tiny", "--limit", "2",
                           "--warmup", "1", "--steps", "1", "--skip-tests", "--budget-s", "1200", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done, out


@pytest.mark.slow
def test_gpu_check_rehearses_on_the_cpu(gpu_check_rehearsal):
    done, out = gpu_check_rehearsal
    assert "median s/step" in done.stdout and "FSDP 1 process" in done.stdout  # the table and the checks
    summary = json.loads((out / "gpu_check.json").read_text())
    assert [row["config"] for row in summary["rows"]] == ["tiny LoRA r8 9x32x48 fp8+offload", "tiny LoRA r8 9x32x48 plain"]
    for index, row in enumerate(summary["rows"]):
        # each row's figures are its own bench_train.py runs': the measured step and the dry run's count
        measured = json.loads((out / f"run-{index}.json").read_text())["variants"]["cogtrain"]
        counted = json.loads((out / f"meta-{index}.json").read_text())
        assert row["median_s"] == measured["median_s"] > 0, row
        assert row["model_flops_per_step"] == counted["model_flops_per_step"] > 0, row
        assert row["meta_peak_gib"] == counted["meta_device_memory_gb"]["peak"], row
        assert f"{row['config']:<46}" in done.stdout and f"{row['median_s']:>14.3f}" in done.stdout
    # cogprep's real-size models, rehearsed on a 9x32x48 clip and 2 T5-XXL layers, in the same table
    assert "cogprep at real size" in done.stdout and "clips/min at 49x480x720" in done.stdout
    prep = summary["prep"]
    assert prep == json.loads((out / "prep.json").read_text())  # bench_prep.py's own figures, unchanged
    assert prep["vae"]["49x480x720"]["measured_clip"] == "9x32x48" and prep["t5"]["layers_measured"] == [1, 2]
    assert prep["clips_per_minute_49x480x720"] > 0 and prep["target"].startswith("pending")
    assert f"{prep['clips_per_minute_49x480x720']:.2f}" in done.stdout


@pytest.mark.slow
def test_bench_prep_measures_every_stage(tmp_path):
    result, work = tmp_path / "bench.json", tmp_path / "work"
    done = _run("bench_prep.py", "--clips", "2", "--frames", "9", "--height", "32", "--width", "48",
                "--noop-entries", "50", "--json-out", str(result), "--keep", str(work))
    measured = json.loads(result.read_text())
    # the readable table shows the figures --json-out wrote
    for figure in ("a_full_encode_clips_per_s", "b_decode_only_clips_per_s", "c_encode_only_clips_per_s",
                   "c_pack_only_clips_per_s"):
        assert f"{measured[figure]:.3f} clips/s" in done.stdout, figure
    assert f"{measured['d_wall_over_slower_stage']:.3f}" in done.stdout
    assert f"{measured['e_noop_rerun_s']:.3f} s" in done.stdout
    # (a) 2 clips in the wall time it gives, part of it spent waiting for decoded clips
    wall = measured["a_full_encode_wall_s"]
    rounding = 0.005 / wall  # the JSON gives the wall to 0.01 s: a wall under 0.5 s is off by more than 1 %
    assert measured["a_full_encode_clips_per_s"] == pytest.approx(2 / wall, rel=0.01 + rounding, abs=0.001)
    assert 0 <= measured["a_waited_for_decoded_clips_s"] <= wall
    # (d) the wall over the slowest of the three stages timed alone (each from its rate: 2 clips over its time)
    slowest = max(2 / measured[f] for f in ("b_decode_only_clips_per_s", "c_encode_only_clips_per_s",
                                             "c_pack_only_clips_per_s"))
    assert measured["d_wall_over_slower_stage"] == pytest.approx(wall / slowest, rel=0.02 + rounding)
    assert 0 < measured["e_noop_rerun_s"] < measured["e_noop_rerun_process_s"]  # a new process also imports
    # (f) the tiny store's bytes on disk as listed here (caches left out), against the naive float32 layout of
    # each sample: mean and logvar 16 x 3 x 4 x 6, the embedding 226 x 16
    sizes = measured["f_bytes_per_sample"]
    store = work / "store"
    on_disk = sum(p.stat().st_size for p in store.rglob("*") if p.is_file() and ".cache" not in p.parts)
    assert sizes["tiny_store_bytes_per_sample"] == round(on_disk / 2)
    assert sizes["tiny_naive_bytes_per_sample"] == 4 * (2 * 16 * 3 * 4 * 6 + 226 * 16)
    # CogVideoX-5b at 49x480x720: 16 x 13 x 60 x 90 latents, a 226 x 4096 T5 embedding; smaller than that
    # layout, and gzip takes something off
    assert sizes["cogvideox_5b_naive_bytes_per_sample"] == 4 * (2 * 16 * 13 * 60 * 90 + 226 * 4096)
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
    # the headline figures are the most workers' (--workers' default 1,2), and the slowdown is the two speeds' ratio
    assert sorted(verify["by_workers"]) == ["1", "2"] and verify["verify_mb_s"] == verify["by_workers"]["2"]["mb_s"]
    assert verify["slowdown_vs_plain_read"] == pytest.approx(verify["plain_read_mb_s"] / verify["verify_mb_s"])
    # the cores-needed projection divides each disk's speed by what verify does with one core
    here = verify["cores_for_disk_speed"]["the plain read here"]
    assert here == math.ceil(verify["plain_read_mb_s"] / verify["verify_mb_per_core_s"])
    # the readable table shows the figures --json-out wrote, and the verdicts are theirs against the targets
    startup = measured["a_startup_check"]
    assert f"{startup['check_s']:.3f} s" in done.stdout and f"{verify['verify_mb_s']:.0f} MB/s" in done.stdout
    assert f"{verify['slowdown_vs_plain_read']:.2f}" in done.stdout
    assert measured["pass"] == {"startup_check": startup["check_s"] < table_target(done.stdout, "start-up"),
                                "verify": verify["slowdown_vs_plain_read"] <= table_target(done.stdout, "verify time")}


def table_target(table: str, row: str) -> float:
    """The target bench_faults.py's table prints on the row that starts with `row` ("< 2 s", "<= 1.5")."""
    [line] = [line for line in table.splitlines() if line.startswith(row)]
    return float(line.split("<", 1)[1].lstrip("= ").split()[0])


T5_XXL_LAYER_PARAMETERS = 4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * 4096
"""One T5-XXL encoder layer: q, k, v, o (4096 x 4096), the gated-GELU feed-forward (two 4096 x 10240 in, one
out) and two RMSNorm scales."""
T5_XXL_FIXED_PARAMETERS = 32128 * 4096 + 4096 + 32 * 64
"""The embedding, the final norm, and the relative position bias of the first layer (32 buckets x 64 heads)."""


@pytest.mark.slow
def test_bench_prep_real_size_measures_the_vae_and_projects_t5_xxl(gpu_check_rehearsal):
    """`bench_prep.py real-size --device cpu --vae-clip 9x32x48 --t5-layers 2` as gpu_check.py's CPU rehearsal
    runs it (PREP_OPTIONS["tiny"]): its output and --json-out file, kept in the rehearsal's folder."""
    _, out = gpu_check_rehearsal
    printed = (out / "prep.log").read_text()
    measured = json.loads((out / "prep.json").read_text())
    assert measured["vae"]["49x480x720"]["measured_clip"] == "9x32x48" and measured["t5"]["tokens"] == 226
    assert "clips/min at 49x480x720" in printed and "projected from 9x32x48" in printed
    gib = 2**30
    for clip, frames_pixels in (("49x480x720", 49 * 480 * 720), ("81x768x1360", 81 * 768 * 1360)):
        vae = measured["vae"][clip]
        assert vae["projected"] and vae["latent_shape"] == [1, 16, 3, 4, 6]  # 4x in time, 8x in space
        assert vae["seconds"] == pytest.approx(vae["measured_seconds"] * frames_pixels / (9 * 32 * 48))
        assert vae["peak_gib"] > vae["weights_gib"]
    # the real VAE's weights, float32 on the CPU (CogVideoX's VAE has 215.6 M parameters, encoder and decoder)
    assert 210e6 < measured["vae"]["49x480x720"]["weights_gib"] * gib / 4 < 220e6
    t5 = measured["t5"]
    assert t5["projected"] and t5["layers_measured"] == [1, 2]
    assert t5["weights_gib_per_layer"] * gib / 4 == pytest.approx(T5_XXL_LAYER_PARAMETERS)
    assert t5["weights_gib"] * gib / 4 == pytest.approx(T5_XXL_FIXED_PARAMETERS + 24 * T5_XXL_LAYER_PARAMETERS)
    assert t5["seconds"] > t5["measured"]["2"]["seconds"] > 0
    assert measured["clips_per_minute_49x480x720"] == pytest.approx(
        60 / (measured["vae"]["49x480x720"]["seconds"] + t5["seconds"]))
    assert measured["target"].startswith("pending")  # no H100 measured it


def test_bench_prep_real_size_refuses_a_t5_it_cannot_project(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_prep.py"), "real-size", "--t5-layers", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--t5-layers 1: from 2 to 24" in done.stderr
