"""Resume on one and two processes, from every way a run stops: finished and extended, kill -9, and a stop
signal (SIGTERM / SIGUSR1: a checkpoint at the step in flight, exit 75). The resumed run must give the losses and
weights of a run never stopped.

Each run here is a new process (torchrun for two ranks, gloo on the CPU), as a cluster runs it: the signals and
the kill reach a real process, not the test's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cogtune.train.preemption import EXIT_PREEMPTED
from train_helpers import (
    LAUNCH_ENV,
    assert_same_tensors,
    cogtrain_command,
    launch,
    logged_lrs,
    losses,
    scheduled_lrs,
)

STEPS = 30
"""Steps of every run: enough (about 0.1 s each) for a signal to land mid-run."""
COMMON = ("--checkpoint-every", "5", "--keep-checkpoints", "0", "--lora-dropout", "0.1", "--caption-dropout", "0.3")
"""Dropout in the LoRA and on captions: resume must restore the global generators and the per-step ones."""
MODES = {
    "lora": ((), "pytorch_lora_weights.safetensors"),
    "sft": (("--learning-rate", "1e-5", "--no-gradient-checkpointing"), "transformer/diffusion_pytorch_model.safetensors"),
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def whole_runs(train_store, tiny_models, tmp_path_factory):
    """Runs of STEPS steps never stopped, made once per (processes, mode): what every resumed run must equal."""
    made: dict[tuple[int, str], Path] = {}

    def get(processes: int, mode: str) -> Path:
        if (processes, mode) not in made:
            run = tmp_path_factory.mktemp(f"whole-{processes}-{mode}") / "run"
            launch(command(train_store, tiny_models["5b"], run, mode, processes, "--max-steps", STEPS))
            made[processes, mode] = run
        return made[processes, mode]

    return get


def command(store: Path, model: Path, run: Path, mode: str, processes: int, *args) -> list[str]:
    return cogtrain_command(store, model, run, "--mode", mode, *MODES[mode][0], *COMMON, *args, processes=processes)


def assert_equals_whole(run: Path, whole: Path, mode: str) -> None:
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    assert losses(run) == losses(whole)
    weights = MODES[mode][1]
    assert_same_tensors(run / weights, whole / weights)


def start(cmd: list[str]) -> subprocess.Popen:
    # a session of its own: kill -9 of the whole job (launcher and ranks) as a scheduler does it
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=LAUNCH_ENV,
                            start_new_session=True)


def wait_for_step(process: subprocess.Popen, run: Path, step: int) -> None:
    """Wait until the run has logged `step` steps (it must still be running then)."""
    deadline = time.monotonic() + 240
    while not (run / "losses.jsonl").exists() or len((run / "losses.jsonl").read_text().splitlines()) < step:
        assert process.poll() is None, f"the run ended before step {step}:\n{process.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "the run did not reach step {step} in time"
        time.sleep(0.01)


def ranks(launcher: subprocess.Popen) -> list[int]:
    """The rank processes torchrun started, in rank order (their pids grow with their rank)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == launcher.pid:
            children.append(int(stat.parent.name))
    return sorted(children)


@pytest.mark.parametrize("mode", ["lora", "sft"])
def test_two_processes_finished_then_extended_equal_a_run_never_stopped(train_store, tiny_models, tmp_path,
                                                                        whole_runs, mode):
    run, model = tmp_path / "run", tiny_models["5b"]
    launch(command(train_store, model, run, mode, 2, "--max-steps", 12))
    launch(command(train_store, model, run, mode, 2, "--max-steps", STEPS, "--resume", "latest"))
    assert_equals_whole(run, whole_runs(2, mode), mode)


@pytest.mark.parametrize("processes", [1, 2])
def test_kill_9_then_resume_latest_equals_a_run_never_stopped(train_store, tiny_models, tmp_path, whole_runs,
                                                              processes):
    run, model = tmp_path / "run", tiny_models["5b"]
    job = start(command(train_store, model, run, "lora", processes, "--max-steps", STEPS))
    wait_for_step(job, run, 7)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    logged = len(losses(run))
    assert logged < STEPS, "the kill came after the run had finished: nothing was tested"
    launch(command(train_store, model, run, "lora", processes, "--max-steps", STEPS, "--resume", "latest"))
    assert_equals_whole(run, whole_runs(processes, "lora"), "lora")


@pytest.mark.parametrize(
    ("processes", "signalled", "signal_name"),
    [(1, "all", "SIGTERM"), (1, "all", "SIGUSR1"), (2, "one", "SIGTERM"), (2, "all", "SIGTERM")],
)
def test_a_stop_signal_checkpoints_the_step_in_flight_and_resume_equals_a_run_never_stopped(
        train_store, tiny_models, tmp_path, whole_runs, processes, signalled, signal_name):
    run, model = tmp_path / "run", tiny_models["5b"]
    job = start(command(train_store, model, run, "lora", processes, "--max-steps", STEPS))
    wait_for_step(job, run, 3)
    targets = [job.pid] if processes == 1 else ranks(job)
    assert len(targets) == processes
    # "one": the last rank alone, as when a node's agent signals its own processes; the others must follow
    for pid in targets[-1:] if signalled == "one" else targets:
        os.kill(pid, getattr(signal, signal_name))
    output, _ = job.communicate(timeout=240)

    stopped = max(losses(run))
    assert stopped < STEPS, "the signal came after the run had finished: nothing was tested"
    if processes == 1:
        assert job.returncode == EXIT_PREEMPTED, output[-3000:]
    else:  # torchrun reports its ranks' codes and fails itself
        assert job.returncode != 0 and f"exitcode  : {EXIT_PREEMPTED}" in output, output[-3000:]
    # rank 0 names the signal when it had one by the end of that step; with both signalled it may not have yet
    by = {1: signal_name, 2: "a signal to another rank" if signalled == "one" else ""}[processes]
    assert f"cogtrain: warning: stopped by {by}" in output and f"after step {stopped}; checkpoint" in output, output[-3000:]
    # the step in flight is checkpointed, whatever --checkpoint-every says; nothing after it was logged
    assert (run / "checkpoints" / f"step-{stopped:06d}" / "train_state.json").is_file()
    assert not (run / "pytorch_lora_weights.safetensors").exists()
    assert not list((run / "checkpoints").glob(".*"))  # no temporary folder left

    launch(command(train_store, model, run, "lora", processes, "--max-steps", STEPS, "--resume", "latest"))
    assert_equals_whole(run, whole_runs(processes, "lora"), "lora")


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
@pytest.mark.parametrize("mode", ["lora", "sft"])
def test_resume_on_another_number_of_processes_trains_the_rest_of_the_epoch_once(train_store, tiny_models, tmp_path,
                                                                                 mode, before, after):
    """One batch per sample (--batch-size 1). The first launch takes one step, the second finishes the epoch on
    another number of processes: every sample is trained once, but for the new world's padding repeats."""
    from cogtune.shared.store import read_index

    run, model = tmp_path / "run", tiny_models["5b"]
    samples = len(read_index(train_store))
    # warm-up longer than the run: the logged lr shows whether the schedule was re-counted for the new world
    args = ("--batch-size", "1", "--log-samples", "--lr-scheduler", "constant_with_warmup", "--lr-warmup-steps",
            "8", "--learning-rate", "1e-3")
    launch(command(train_store, model, run, mode, before, "--max-steps", 1, *args))
    total = 1 + -(-(samples - before) // after)  # the epoch's remaining batches, shared out
    launch(command(train_store, model, run, mode, after, "--max-steps", total, "--resume", "latest", *args))

    taken = {rank: [json.loads(line) for line in (run / "samples" / f"rank-{rank}.jsonl").read_text().splitlines()]
             for rank in range(max(before, after))}
    first = [row for rank in range(before) for entry in taken[rank] if entry["step"] == 1 for row in entry["rows"]]
    rest = [row for rank in range(after) for entry in taken[rank] if entry["step"] > 1 for row in entry["rows"]]
    assert sorted(set(first) | set(rest)) == list(range(samples))
    assert not set(first) & set(rest)
    assert len(rest) - len(set(rest)) < after
    assert sorted(losses(run)) == list(range(1, total + 1))
    assert logged_lrs(run) == pytest.approx(scheduled_lrs("constant_with_warmup", 1e-3, 8, total))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps_per_rank"] == [total] * after
