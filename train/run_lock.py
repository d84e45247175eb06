"""One cogtrain per run folder: an exclusive lock held by the job's rank 0 from its first check to its exit.

Two runs into one folder would interleave their losses.jsonl and alternate their checkpoints. The lock is an
flock on ``RUN/.cogtrain.lock``, which the operating system releases when its process dies, so a lock left by
a crashed or killed run never blocks the next one. The file names its holder (host, pid, start time) for the
refusal's message, and is removed on the way out.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..shared.errors import CogtuneError

LOCK_FILE = ".cogtrain.lock"


@contextmanager
def hold_run_folder(run: Path) -> Iterator[None]:
    """Hold the run folder's lock (the folder is made if missing, and removed again if the run leaves it empty).

    Refused with one line naming the holder while another cogtrain holds it.
    """
    run = Path(run)
    created = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    fd = _lock(run / LOCK_FILE)
    try:
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        # removed while still held: a run that opened the file before the unlink finds it gone (see _lock)
        (run / LOCK_FILE).unlink(missing_ok=True)
        os.close(fd)
        if created and not any(run.iterdir()):
            shutil.rmtree(run, ignore_errors=True)  # a refused run leaves nothing behind


def _lock(path: Path) -> int:
    """An fd of `path` holding its exclusive lock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise CogtuneError(
                f"{path.parent}: another cogtrain is running in this run folder ({holder}): wait for it to end, "
                f"or choose another --out"
            ) from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file between our open and our lock: lock the new one


def _describe_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


def is_lock_file(path: Path) -> bool:
    """Whether `path` is the run lock: a run folder holding only it holds no run."""
    return path.name == LOCK_FILE
