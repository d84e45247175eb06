"""Helpers for the cogtrain tests: run the CLI in this process or as a launch, read a run folder back."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from cogtune.train import cli as train_cli
from safetensors.torch import load_file
from typer.testing import CliRunner

FAST = ("--mixed-precision", "no", "--report-to", "none", "--no-progress", "--rank", "4")
"""Options every test run takes: float32 on the CPU, no tracker, no bar, a small adapter."""


def cogtrain(store: Path, model: Path, out: Path, *args: str, expect: int = 0):
    """`cogtrain run` in this process; returns the click Result."""
    argv = ["run", "--store", store, "--model", model, "--out", out, *FAST, *args]
    result = CliRunner().invoke(train_cli.app, [str(a) for a in argv])
    assert result.exit_code == expect, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cogtrain_command(store: Path, model: Path, out: Path, *args: str, processes: int = 1) -> list[str]:
    """`cogtrain run` as a new process: alone, or under torchrun with `processes` ranks (gloo on the CPU)."""
    if processes == 1:
        launcher = [sys.executable, "-m"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_port", str(free_port()), "-m"]
    return [*launcher, "cogtune.train.cli", "run", "--store", str(store), "--model", str(model), "--out", str(out),
            *FAST, *map(str, args)]


LAUNCH_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
"""One thread per process: two ranks on two cores."""


@contextmanager
def one_thread():
    """Torch on one thread, as LAUNCH_ENV runs a launched process: a run in this process then computes what a
    launched one does, to the bit, and a resume can mix the two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def launch(command: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=LAUNCH_ENV)
    assert done.returncode == expect, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def losses(run: Path) -> dict[int, float]:
    lines = (run / "losses.jsonl").read_text().splitlines()
    return {entry["step"]: entry["loss"] for entry in map(json.loads, lines)}


def assert_same_tensors(a: Path, b: Path) -> None:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{a.name}: {name} differs"


def scheduled_lrs(name: str, learning_rate: float, warmup: int, steps: int) -> list[float]:
    """The learning rate after each of `steps` optimizer steps, as diffusers' `get_scheduler` gives it alone."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=learning_rate)
    schedule = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    lrs = []
    for _ in range(steps):
        optimizer.step()
        schedule.step()
        lrs.append(schedule.get_last_lr()[0])
    return lrs


def logged_lrs(run: Path) -> list[float]:
    return [json.loads(line)["lr"] for line in (run / "losses.jsonl").read_text().splitlines()]


def assert_close_runs(run: Path, reference: Path, weights: str) -> None:
    """Two runs trained alike: the same steps, losses within float32 summation order, the same weights (all
    changed), and every rank of `run` ending with the same weights."""
    mine, theirs = losses(run), losses(reference)
    assert sorted(mine) == sorted(theirs)
    for step in mine:
        assert mine[step] == pytest.approx(theirs[step], rel=1e-5, abs=1e-7), f"step {step}"
    first, second = load_file(run / weights), load_file(reference / weights)
    assert first.keys() == second.keys()
    changed = 0
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-4, atol=1e-6, msg=name)
        changed += 1
    assert changed
    summary = json.loads((run / "summary.json").read_text())
    assert len(set(summary["trained_weights_sha256_per_rank"])) == 1  # every rank ends with the same weights
