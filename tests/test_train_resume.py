"""Resume on one and two processes, from every way a run stops: finished and extended, kill -9, and a stop
signal (SIGTERM / SIGUSR1: a checkpoint at the step in flight, exit 75). The resumed run must give the losses and
weights of a run never stopped.

Every run a signal or a kill stops is a new process (torchrun for two ranks, gloo on the CPU), as a cluster runs it:
the signals and the kill reach a real process, not the test's. One run folder goes through several stops, each
resumed from where the last left it, so one launch serves two checks. A single-process run nothing stops trains in
this process, on one thread as the launched ones do: a launch costs seconds of imports.
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
    cogtrain,
    cogtrain_command,
    launch,
    logged_lrs,
    losses,
    one_thread,
    scheduled_lrs,
)

STEPS = 30
"""Steps of every run: enough (about 0.1 s each) for three stops to land mid-run."""
FIRST_STEPS = 16
"""Where the two-process runs first finish, before they are extended to STEPS: after two stops (at step 3 or so,
then 3 steps later), before the first checkpoint the kill in the extension must follow."""
CHECKPOINT_EVERY = 5
COMMON = ("--checkpoint-every", str(CHECKPOINT_EVERY), "--keep-checkpoints", "0", "--lora-dropout", "0.1",
          "--caption-dropout", "0.3")
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
            finish(train_store, tiny_models["5b"], run, mode, processes, "--max-steps", STEPS)
            made[processes, mode] = run
        return made[processes, mode]

    return get


def command(store: Path, model: Path, run: Path, mode: str, processes: int, *args) -> list[str]:
    return cogtrain_command(store, model, run, "--mode", mode, *MODES[mode][0], *COMMON, *args, processes=processes)


def finish(store: Path, model: Path, run: Path, mode: str, processes: int, *args) -> None:
    """A run to its end: launched under torchrun on two processes, in this process on one."""
    if processes == 1:
        with one_thread():
            cogtrain(store, model, run, "--mode", mode, *MODES[mode][0], *COMMON, *map(str, args))
    else:
        launch(command(store, model, run, mode, processes, *args))


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
        assert time.monotonic() < deadline, f"the run did not reach step {step} in time"
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


def stop(job: subprocess.Popen, run: Path, processes: int, signalled: str, signal_name: str, max_steps: int) -> int:
    """Send `signal_name` to every rank of `job` ("all") or to the last alone ("one", as when a node's agent signals
    its own processes: the others must follow); check it checkpointed the step in flight and stopped there."""
    targets = [job.pid] if processes == 1 else ranks(job)
    assert len(targets) == processes
    for pid in targets[-1:] if signalled == "one" else targets:
        os.kill(pid, getattr(signal, signal_name))
    output, _ = job.communicate(timeout=240)

    stopped = max(losses(run))
    assert stopped < max_steps, "the signal came after the run had finished: nothing was tested"
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
    return stopped


def kill_9_after_a_checkpoint(job: subprocess.Popen, run: Path, resumed_at: int) -> None:
    """kill -9 of the whole job (launcher and ranks) two steps after the first periodic checkpoint past
    `resumed_at`: the steps logged after that checkpoint must be trained again, the same."""
    checkpoint = (resumed_at // CHECKPOINT_EVERY + 1) * CHECKPOINT_EVERY
    wait_for_step(job, run, checkpoint + 2)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert len(losses(run)) < STEPS, "the kill came after the run had finished: nothing was tested"


def test_one_process_stopped_by_sigterm_sigusr1_and_kill_9_then_resumed_equals_a_run_never_stopped(
        train_store, tiny_models, tmp_path, whole_runs):
    """One run folder through every way a lone process stops, each resumed from where the last left it."""
    run, model = tmp_path / "run", tiny_models["5b"]
    job = start(command(train_store, model, run, "lora", 1, "--max-steps", STEPS))
    wait_for_step(job, run, 3)
    by_sigterm = stop(job, run, 1, "all", "SIGTERM", STEPS)

    job = start(command(train_store, model, run, "lora", 1, "--max-steps", STEPS, "--resume", "latest"))
    wait_for_step(job, run, by_sigterm + 3)
    by_sigusr1 = stop(job, run, 1, "all", "SIGUSR1", STEPS)

    job = start(command(train_store, model, run, "lora", 1, "--max-steps", STEPS, "--resume", "latest"))
    kill_9_after_a_checkpoint(job, run, by_sigusr1)

    finish(train_store, model, run, "lora", 1, "--max-steps", STEPS, "--resume", "latest")
    assert_equals_whole(run, whole_runs(1, "lora"), "lora")


def test_two_processes_stopped_by_signals_finished_extended_and_killed_then_resumed_equal_a_run_never_stopped(
        train_store, tiny_models, tmp_path, whole_runs):
    """One run folder on two processes: a stop signal to one rank, then to both; the run finished at FIRST_STEPS,
    then extended to STEPS and killed -9 on the way; each launch resumes from where the last left it."""
    run, model = tmp_path / "run", tiny_models["5b"]
    job = start(command(train_store, model, run, "lora", 2, "--max-steps", FIRST_STEPS))
    wait_for_step(job, run, 3)
    by_one = stop(job, run, 2, "one", "SIGTERM", FIRST_STEPS)

    job = start(command(train_store, model, run, "lora", 2, "--max-steps", FIRST_STEPS, "--resume", "latest"))
    wait_for_step(job, run, by_one + 3)
    stop(job, run, 2, "all", "SIGTERM", FIRST_STEPS)

    finish(train_store, model, run, "lora", 2, "--max-steps", FIRST_STEPS, "--resume", "latest")
    assert sorted(losses(run)) == list(range(1, FIRST_STEPS + 1))
    assert (run / MODES["lora"][1]).is_file()

    job = start(command(train_store, model, run, "lora", 2, "--max-steps", STEPS, "--resume", "latest"))
    kill_9_after_a_checkpoint(job, run, FIRST_STEPS)

    finish(train_store, model, run, "lora", 2, "--max-steps", STEPS, "--resume", "latest")
    assert_equals_whole(run, whole_runs(2, "lora"), "lora")


def test_full_fine_tune_on_two_processes_finished_then_extended_equals_a_run_never_stopped(
        train_store, tiny_models, tmp_path, whole_runs):
    run, model = tmp_path / "run", tiny_models["5b"]
    finish(train_store, model, run, "sft", 2, "--max-steps", FIRST_STEPS)
    finish(train_store, model, run, "sft", 2, "--max-steps", STEPS, "--resume", "latest")
    assert_equals_whole(run, whole_runs(2, "sft"), "sft")


@pytest.mark.parametrize("mode", ["lora", "sft"])
def test_resume_on_another_number_of_processes_trains_the_rest_of_the_epoch_once(train_store, tiny_models, tmp_path,
                                                                                 mode):
    """One batch per sample (--batch-size 1). The first epoch takes one step on one process and the rest on two,
    the second one step on two processes and the rest on one: each epoch trains every sample once, but for the
    two-process padding repeats."""
    from cogtune.shared.store import read_index

    run, model = tmp_path / "run", tiny_models["5b"]
    samples = len(read_index(train_store))
    first_epoch_end = 1 + -(-(samples - 1) // 2)  # the epoch's remaining batches, shared out on two
    second_epoch_end = first_epoch_end + 1 + (samples - 2)
    # warm-up longer than the run: the logged lr shows whether the schedule was re-counted for the new world
    args = ("--batch-size", "1", "--log-samples", "--lr-scheduler", "constant_with_warmup", "--lr-warmup-steps",
            "8", "--learning-rate", "1e-3")
    assert second_epoch_end < 8
    finish(train_store, model, run, mode, 1, "--max-steps", 1, *args)
    finish(train_store, model, run, mode, 2, "--max-steps", first_epoch_end + 1, "--resume", "latest", *args)
    assert json.loads((run / "summary.json").read_text())["steps_per_rank"] == [first_epoch_end + 1] * 2
    finish(train_store, model, run, mode, 1, "--max-steps", second_epoch_end, "--resume", "latest", *args)
    assert json.loads((run / "summary.json").read_text())["steps_per_rank"] == [second_epoch_end]

    taken = [json.loads(line) for rank in (0, 1) for line in (run / "samples" / f"rank-{rank}.jsonl").read_text()
             .splitlines()]

    def rows(first_step: int, last_step: int) -> list[int]:
        return [row for entry in taken if first_step <= entry["step"] <= last_step for row in entry["rows"]]

    for start, switch, end, after in ((1, 2, first_epoch_end, 2),
                                      (first_epoch_end + 1, first_epoch_end + 2, second_epoch_end, 1)):
        first, rest = rows(start, switch - 1), rows(switch, end)
        assert sorted(set(first) | set(rest)) == list(range(samples)), (start, end)
        assert not set(first) & set(rest)
        assert len(rest) - len(set(rest)) < after
    assert sorted(losses(run)) == list(range(1, second_epoch_end + 1))
    assert logged_lrs(run) == pytest.approx(scheduled_lrs("constant_with_warmup", 1e-3, 8, second_epoch_end))
