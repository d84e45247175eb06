"""A full disk under cogprep and cogtrain: one line naming the path, the free space and what to do; the store or
run keeps its last commit; no temporary file is left on the full disk; cogprep refuses up front an encode the
disk cannot hold.

The disk is a small tmpfs mounted for the test where the test may mount one (as root, as CI runs); elsewhere the
write that fails is made to raise ENOSPC, as a full disk raises it.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cogtune.shared import store as S
from prep_helpers import add_clip, encode, moved_store
from train_helpers import cogtrain, losses


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(bytes) -> a folder on a tmpfs of that size, or None where none can be mounted."""
    mounted: list[Path] = []

    def mount(size: int) -> Path | None:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True)
        if done.returncode != 0:
            return None
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        # lazy: a file the test process still maps (a loaded checkpoint) must not leave the mount behind
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def files_bytes(folder: Path) -> int:
    """Bytes a tmpfs gives the files of `folder`: whole pages."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


def test_a_full_disk_under_cogtrain_is_one_line_and_the_last_checkpoint_stays(train_store, tiny_models, tmp_path,
                                                                              small_disk, monkeypatch):
    model, common = tiny_models["5b"], ("--checkpoint-every", "1", "--keep-checkpoints", "0")
    probe = tmp_path / "probe"  # how much a run with two checkpoints takes
    cogtrain(train_store, model, probe, "--max-steps", "2", *common)
    checkpoint = files_bytes(probe / "checkpoints" / "step-000002")
    disk = small_disk(files_bytes(probe) + checkpoint // 2 + 8 * 4096)
    if disk is None:  # no mount here: the third checkpoint's write fails as on a full disk
        from accelerate import Accelerator

        real, calls = Accelerator.save_state, []

        def save_state(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Accelerator, "save_state", save_state)
        disk = tmp_path / "disk"
    run = disk / "run"
    result = cogtrain(train_store, model, run, "--max-steps", "5", *common, expect=2)
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1, result.stderr
    failed = int(line.split("cannot write the checkpoint of step ")[1].split()[0])  # 3, give or take a page
    assert failed > 1, line
    # torch.save says "iostream error" or "unexpected pos" where Python says ENOSPC: the free space tells
    assert line.startswith(f"error: {run}/checkpoints/.step-{failed:06d}.tmp: cannot write the checkpoint of step "
                           f"{failed} ("), line
    assert line.endswith(" free on that disk): free space, then continue with --resume latest (the last "
                         f"checkpoint, step-{failed - 1:06d}, is intact)"), line
    # no .tmp left on the full disk; the checkpoints before it intact
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{s:06d}" for s in range(1, failed)]

    monkeypatch.undo()
    if disk.is_mount():
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)  # space freed
    cogtrain(train_store, model, run, "--max-steps", "5", *common, "--resume", "latest")
    assert sorted(losses(run)) == [1, 2, 3, 4, 5]
    assert [losses(run)[step] for step in (1, 2)] == [losses(probe)[step] for step in (1, 2)]


def test_the_next_run_removes_what_a_run_killed_while_checkpointing_left(train_store, tiny_models, tmp_path):
    run = tmp_path / "run"
    cogtrain(train_store, tiny_models["5b"], run, "--max-steps", "1")
    leftover = run / "checkpoints" / ".step-000007.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half of it")
    cogtrain(train_store, tiny_models["5b"], run, "--max-steps", "2", "--resume", "latest")
    assert not leftover.exists()


def test_cogprep_refuses_up_front_an_encode_the_disk_cannot_hold(demo_txt, demo_store, tiny_models, tmp_path,
                                                                 small_disk, monkeypatch):
    from cogtune.preprocess import encode as encode_module

    written = S.bytes_by_part(demo_store)  # the same encode where there is room: what it really writes
    shards = written["video shards"] + written["text shards"]

    disk = small_disk(64 * 1024)
    if disk is None:
        disk = tmp_path / "disk"
        disk.mkdir()
        monkeypatch.setattr(encode_module, "free_bytes", lambda path: 64 * 1024)
    result = encode(demo_txt, tiny_models["5b"], disk, expect=2)
    line = result.stderr.strip()
    assert line.startswith(f"error: {disk}: this encode writes up to ") and "(5 clips, 5 captions), the disk has " \
        in line and line.endswith("free: free space, or encode into a folder on another disk"), line
    assert not any(disk.iterdir())  # refused before any work
    figure, unit = line.split("writes up to ")[1].split()[:2]  # an upper bound of what the shards take
    assert float(figure) * {"B": 1, "KB": 1024, "MB": 1024**2}[unit] >= shards


def test_a_full_disk_mid_encode_is_one_line_and_the_store_keeps_its_last_commit(demo_txt, demo_store, tiny_models,
                                                                                 tmp_path, monkeypatch):
    dataset = shutil.copytree(demo_txt, tmp_path / "data")
    store = moved_store(demo_store, dataset, tiny_models["5b"], tmp_path / "store")
    index_before = (store / S.INDEX).read_bytes()
    add_clip(dataset, "new-1.mp4", "a new clip", seed=1)
    add_clip(dataset, "new-2.mp4", "another new clip", seed=2)

    real, calls = S.ShardWriter.add, []

    def add(self, key, members):
        calls.append(key)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, members)

    monkeypatch.setattr(S.ShardWriter, "add", add)
    result = encode(dataset, tiny_models["5b"], store, expect=2)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr  # (transformers' own loading bar may precede it)
    line = errors[0]
    assert line.startswith(f"error: {store}: cannot write the store (No space left on device; ")
    assert line.endswith("free on that disk): free space, then run cogprep encode again (the store keeps its last "
                         "commit, and the shards finished before the failure are reused)")
    assert (store / S.INDEX).read_bytes() == index_before  # the last commit
    assert not list(store.rglob("*.tmp"))  # the failing run took its temporary shards with it

    monkeypatch.undo()
    encode(dataset, tiny_models["5b"], store)
    assert len(S.read_index(store)) == 7
    assert json.loads((store / S.REPORT).read_text())["samples"] == 7
