"""Locks: one cogprep per store (creating it included), one cogtrain per run folder, and a lock whose holder
died never blocks. A store on a read-only file system is refused in one line before any work."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
from cogtune.shared import store as S
from prep_helpers import TINY_BUCKETS, encode
from train_helpers import LAUNCH_ENV, cogtrain, losses

HOLD = """
import sys, time
from cogtune.shared.store import store_lock
from cogtune.train.run_lock import hold_run_folder
kind, path = sys.argv[1:]
with (store_lock if kind == "store" else hold_run_folder)(path):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder():
    """holder(kind, path): another process holding the store's or the run folder's lock until it is killed."""
    started: list[subprocess.Popen] = []

    def hold(kind: str, path: Path) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLD, kind, str(path)], stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield hold
    for process in started:
        process.kill()
        process.wait()


def test_a_second_cogtrain_into_a_run_folder_in_use_is_refused_naming_the_holder(train_store, tiny_models, tmp_path,
                                                                                 holder):
    out = tmp_path / "run"
    other = holder("run", out)
    result = cogtrain(train_store, tiny_models["5b"], out, "--max-steps", "1", expect=2)
    line = result.stderr.strip()
    assert line.startswith(f"error: {out}: another cogtrain is running in this run folder (pid {other.pid} on ")
    assert len(line.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == [".cogtrain.lock"]  # the refused run wrote nothing

    other.kill()  # dies holding the lock: the operating system releases it, the stale file blocks nothing
    other.wait()
    cogtrain(train_store, tiny_models["5b"], out, "--max-steps", "1")
    assert sorted(losses(out)) == [1]
    assert not (out / ".cogtrain.lock").exists()  # a run removes its lock on the way out


def test_a_refused_cogtrain_leaves_no_run_folder_and_no_lock(train_store, tiny_models, tmp_path):
    out = tmp_path / "run"
    cogtrain(train_store, tiny_models["2b"], out, "--max-steps", "1", expect=2)  # another model's store
    assert not out.exists()


def test_an_encode_into_a_store_in_use_is_refused_and_touches_none_of_its_files(demo_txt, tiny_models, tmp_path,
                                                                               holder):
    """The other cogprep is a first encode under way: its store folder and its open temporary shard exist."""
    store = tmp_path / "store"
    temporary = store / S.SHARDS / "9x32x48" / ".20261203-abc123-r0-000000.tar.tmp"
    temporary.parent.mkdir(parents=True)
    temporary.write_bytes(b"half-written by the other run")
    holder("store", store)
    result = encode(demo_txt, tiny_models["5b"], store, expect=2)
    assert result.stderr.strip() == (
        f"error: {store}: another cogprep (encode or gc) is working on this store; try again later")
    assert temporary.read_bytes() == b"half-written by the other run"
    assert sorted(p.relative_to(store).as_posix() for p in store.rglob("*")) == [
        "shards", "shards/9x32x48", f"shards/9x32x48/{temporary.name}"]


@pytest.mark.slow
def test_two_first_encodes_of_one_store_at_once_do_the_work_once(demo_txt, tiny_models, tmp_path):
    store = tmp_path / "store"
    command = [sys.executable, "-m", "cogtune.preprocess.cli", "encode", str(demo_txt), "--model",
               str(tiny_models["5b"]), "--out", str(store), "--buckets", str(TINY_BUCKETS), "--workers", "0",
               "--no-progress"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=LAUNCH_ENV)
            for _ in range(2)]
    done = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    codes = sorted(code for code, _, _ in done)
    outputs = "\n".join(out + err for _, out, err in done)
    if codes == [0, 2]:  # at the same time: one encodes, the other is refused by the lock
        assert "another cogprep (encode or gc) is working on this store" in outputs
        assert outputs.count("encoded 5 clips") == 1, outputs
    else:  # one after the other: the second finds everything done
        assert codes == [0, 0], outputs
        assert outputs.count("encoded 5 clips") == 1 and outputs.count("encoded 0 clips") == 1, outputs
    assert len(S.IndexColumns(store, ("key",))) == 5


@pytest.fixture
def read_only_folder(tmp_path, monkeypatch) -> Path:
    """A folder on a read-only file system: a read-only tmpfs mounted for the test where the test may mount one
    (root), else a folder whose writes fail with EROFS as they would there."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(S.tempfile, "mkstemp", refuse)
    yield folder
    if mounted:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def test_an_encode_into_a_read_only_store_is_refused_in_one_line(demo_txt, tiny_models, read_only_folder):
    result = encode(demo_txt, tiny_models["5b"], read_only_folder, expect=2)
    assert result.stderr.strip() == (
        f"error: {read_only_folder}: cannot write to the store (Read-only file system): encode into a writable folder")
    assert not any(read_only_folder.iterdir())
