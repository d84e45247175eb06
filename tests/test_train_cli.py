"""What cogtrain says: its --help, the start banner, step lines without a bar, validation's own progress,
--quiet / --verbose, one-line refusals of misplaced paths, and other trainers' option names answered with ours."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cogtune.shared import store as S
from cogtune.train import cli as train_cli
from cogtune.train.peer_options import PEER_OPTIONS
from train_helpers import cogtrain, losses
from typer.testing import CliRunner


def run_options() -> dict[str, object]:
    """{--flag: default} of every cogtrain run option, from the command click builds."""
    import typer.main

    command = typer.main.get_command(train_cli.app).commands["run"]
    return {opt: param.default for param in command.params for opt in (*param.opts, *param.secondary_opts)}


# ---------------------------------------------------------------------------------------------------------
# --help


def test_help_is_whole_at_80_columns_and_through_a_pipe():
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-m", "cogtune.train.cli", "run", "--help"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert not any(mark in done.stdout for mark in ("…", "...", "╭", "│"))  # nothing cut, no rich panel
    words = " ".join(done.stdout.split())  # a long default may wrap between words, never inside one
    for flag, default in run_options().items():
        assert re.search(rf"(^|\s){re.escape(flag)}(\s|$|/)", done.stdout, re.M), flag
        if default not in (None, False, True, "") and flag != "--no-progress":
            assert f"[default: {default}]" in words or f"default: {default}" in words, (flag, default)


# ---------------------------------------------------------------------------------------------------------
# other trainers' option names, and renamed ones


@pytest.mark.parametrize(("argument", "line"), [
    ("--output_dir", "cogtrain uses --out for --output_dir"),
    ("--output_dir=runs/a", "cogtrain uses --out for --output_dir"),
    ("--max_train_steps", "cogtrain uses --max-steps for --max_train_steps"),
    ("--pretrained_model_name_or_path", "cogtrain uses --model for --pretrained_model_name_or_path"),
    ("--train_batch_size", "cogtrain uses --batch-size for --train_batch_size"),
    ("--resume_from_checkpoint", "cogtrain uses --resume for --resume_from_checkpoint"),
    ("--learning_rate", "cogtrain uses --learning-rate for --learning_rate"),
    ("--lora_alpha", "cogtrain uses --lora-alpha for --lora_alpha"),
    ("--gradient_accumulation_steps", "cogtrain uses --gradient-accumulation-steps for --gradient_accumulation_steps"),
    ("--validation_prompt", "--validation_prompt: datasets, frames and validation prompts are cogprep's"),
    ("--validation-steps", "--validation-steps was renamed --validation-inference-steps"),
])
def test_another_trainers_option_is_answered_with_ours_in_one_line(argument, line, tmp_path):
    argv = ["run", "--store", "s", "--model", "m", "--out", str(tmp_path / "run"), argument, "1"]
    result = CliRunner().invoke(train_cli.app, argv)
    assert result.exit_code == 2
    [said] = result.stderr.strip().splitlines()
    assert said.startswith(f"error: {line}"), said
    assert not (tmp_path / "run").exists()


def test_every_answer_names_an_option_cogtrain_has():
    ours = set(run_options())
    for answer in PEER_OPTIONS.values():
        assert answer.split()[0] in ours, answer


def test_a_config_file_with_the_old_validation_key_names_the_new_one(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"store": "s", "model": "m", "out": "o", "validation_steps": 4}))
    result = CliRunner().invoke(train_cli.app, ["run", "--config", str(config)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {config}: validation_steps was renamed validation_inference_steps"


# ---------------------------------------------------------------------------------------------------------
# paths: a file where a folder is wanted, a store as the run folder


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_misplaced_paths_are_one_line_each_and_touch_nothing(train_store, tiny_models, tmp_path):
    model = tiny_models["5b"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    store_before = listing(train_store)
    cases = [
        (train_store / S.STORE_JSON, tmp_path / "run",
         f"{train_store / S.STORE_JSON}: a file; --store wants the store folder cogprep encode wrote: {train_store}"),
        (train_store, a_file, f"{a_file}: a file; --out wants the run folder (made if missing)"),
        (train_store, train_store, f"{train_store}: a cogprep store; --out wants a run folder of its own"),
    ]
    for store, out, words in cases:
        result = cogtrain(store, model, out, "--max-steps", "1", expect=2)
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"error: {words}"), line
    result = cogtrain(train_store, model / "model_index.json", tmp_path / "run", expect=2)
    assert result.stderr.strip() == (f"error: {model / 'model_index.json'}: a file; --model wants the model folder "
                                     f"(or a hub id): {model}")
    assert a_file.read_text() == "mine\n"
    assert listing(train_store) == store_before  # no run lock or anything else left in the store
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# what a run says


STEP_LINE = re.compile(r"^cogtrain: step (\d+)/(\d+)  loss (\S+)  (\S+) s/step  ETA (\d+:\d\d)$")


def test_without_a_bar_a_run_says_where_it_starts_then_a_line_every_n_steps(train_store, tiny_models, tmp_path):
    run = tmp_path / "run"
    result = cogtrain(train_store, tiny_models["5b"], run, "--max-steps", "4", "--log-every", "2",
                      "--validate-every", "2", "--validation-inference-steps", "2", "--checkpoint-every", "2")
    out = result.stdout
    assert "\r" not in result.output
    lines = out.splitlines()
    assert lines[0] == f"cogtrain: new run in {run}"
    assert lines[1].startswith("  1 process on cpu")
    manifest = S.Manifest.load(train_store)
    samples = sum(b["samples"] for b in manifest.buckets)
    assert lines[2].startswith(f"  store {train_store}: {samples} training samples in {len(manifest.buckets)} "
                               "buckets: ")
    for bucket in manifest.buckets:
        assert f"{bucket['name']} {bucket['samples']} (batch {bucket['batch_size']})" in lines[2]
    assert lines[3].startswith("  4 steps planned (") and lines[3].endswith("4 to go")

    steps = [STEP_LINE.match(line) for line in lines if line.startswith("cogtrain: step ") and "/" in line]
    assert [int(m.group(1)) for m in steps] == [2, 4]
    logged = json.loads("[" + ",".join((run / "losses.jsonl").read_text().splitlines()) + "]")
    # s/step is the median of the steps' own times: the validation round at step 2 is not in it
    assert float(steps[-1].group(4)) == float(f"{statistics.median(e['step_time'] for e in logged):.3g}")
    assert steps[-1].group(5) == "0:00" and float(steps[-1].group(3)) == pytest.approx(losses(run)[4], abs=1e-4)

    for step in (2, 4):  # announced before, timed after: the round's time is its own
        assert f"cogtrain: validation at step {step}: 1 video of 2 inference steps" in lines
        assert any(line.startswith(f"cogtrain: validation at step {step}: took ") for line in lines)
    assert lines.index("cogtrain: validation at step 2: 1 video of 2 inference steps") < lines.index(
        steps[-1].group(0))


def test_quiet_says_nothing_and_verbose_says_each_step(train_store, tiny_models, tmp_path):
    quiet = cogtrain(train_store, tiny_models["5b"], tmp_path / "quiet", "--max-steps", "2", "--quiet")
    assert quiet.output == ""
    verbose = cogtrain(train_store, tiny_models["5b"], tmp_path / "verbose", "--max-steps", "2", "--verbose")
    for step in (1, 2):
        assert re.search(rf"^cogtrain: step {step}: loss \S+, lr \S+, grad_norm ", verbose.stdout, re.M)
    assert f"cogtrain: checkpoint of step 2 written: {tmp_path / 'verbose' / 'checkpoints' / 'step-000002'}" in \
        verbose.stdout


def test_resume_latest_says_whether_it_starts_anew_or_where_it_resumes(train_store, tiny_models, tmp_path):
    run = tmp_path / "run"
    first = cogtrain(train_store, tiny_models["5b"], run, "--max-steps", "2", "--resume", "latest")
    assert (f"cogtrain: --resume latest: no checkpoint in {run / 'checkpoints'}, starting a new run"
            in first.stdout.splitlines())
    assert f"cogtrain: new run in {run}" in first.stdout.splitlines()
    again = cogtrain(train_store, tiny_models["5b"], run, "--max-steps", "3", "--resume", "latest")
    checkpoint = run / "checkpoints" / "step-000002"
    assert f"cogtrain: resuming {run} at step 2 (from {checkpoint})" in again.stdout.splitlines()
    assert "1 to go" in again.stdout and "starting a new run" not in again.stdout


# ---------------------------------------------------------------------------------------------------------
# start-up: the pipelines are imported only to validate


@pytest.mark.slow
def test_the_first_step_runs_without_the_pipeline_module(train_store, tiny_models, tmp_path):
    """The pipelines (transformers, the LoRA loaders) and bitsandbytes (which peft imports for quantized layers)
    are seconds of imports a step never uses: a fresh process has imported neither diffusers' CogVideoX pipeline
    module nor bitsandbytes when its first step starts (scripts/bench_start.py measures the seconds)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from bench_start import FIRST_STEP_DRIVER, MARKER, PIPELINE_MODULE

    args = ["--store", str(train_store), "--model", str(tiny_models["5b"]), "--out", str(tmp_path / "run"),
            "--mixed-precision", "no", "--report-to", "none", "--no-progress", "--max-steps", "1"]
    done = subprocess.run([sys.executable, "-c", FIRST_STEP_DRIVER, "plain", *args], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [reached] = [json.loads(line[len(MARKER):]) for line in done.stderr.splitlines() if line.startswith(MARKER)]
    assert reached["loaded"][PIPELINE_MODULE] is False
    assert reached["loaded"]["bitsandbytes"] is False  # installed here (the bnb extra), but peft is kept from it


def test_the_s_per_step_and_eta_come_from_the_steps_own_times():
    from cogtune.train.progress import RunProgress

    progress = RunProgress(10, 0, bar=False, log_every=5)
    for step, seconds in enumerate([2.0, 100.0, 4.0], start=1):  # a slow outlier does not move the median
        progress.step_done(step, {"loss": 0.5, "step_time": seconds})
    assert progress.seconds_per_step() == 4.0
    assert progress.status(3, {"loss": 0.5}) == "loss 0.5000  4 s/step  ETA 0:28"
