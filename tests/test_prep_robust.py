"""cogprep's robustness claims, tested: bad inputs are skipped with a reason (or refused whole with --strict)
while a bug fails the run with its traceback, lists of different lengths and datasets with no usable sample are
refused with nothing written, kill -9 at any moment loses no committed work and re-encodes nothing a closed shard holds, torchrun with two
processes makes the same store as one, and incremental re-encodes after random edits equal from-scratch ones."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from cogtune.preprocess import compute as C
from cogtune.preprocess import plan as P
from cogtune.preprocess.cli import app
from cogtune.preprocess.encode import KILL_HOOK, PENDING
from cogtune.shared import store as S
from cogtune.shared.errors import CogtuneError
from cogtune.shared.video import read_frames, read_video_info, write_video
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from prep_helpers import (
    TINY_BUCKETS,
    add_clip,
    assert_same_content,
    encode,
    read_lines,
    report,
    store_content,
    write_lines,
)
from typer.testing import CliRunner

COGPREP = Path(sys.executable).with_name("cogprep")
"""The console script of this venv: subprocess runs go through the real entry point."""

CAPTIONS = [
    "a red circle moving up over a black background",
    "a green square moving down over a white background",
    "a blue triangle moving left to right over a yellow background",
    "a white circle moving right to left over a purple background",
]
FRAMES, SIZE = 10, 32
"""Base clips: 10 frames at 32x32, one 9x32x32 clip each with the tiny buckets (cheap to encode on a CPU)."""


def _new_txt_dataset(path: Path, count: int) -> Path:
    (path / "videos").mkdir(parents=True)
    (path / "videos.txt").write_text("")
    (path / "prompts.txt").write_text("")
    for i in range(count):
        add_clip(path, f"clip{i}.mp4", CAPTIONS[i], frames=FRAMES, height=SIZE, width=SIZE, seed=100 + i)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_models):
    """Four good clips with four captions, and a from-scratch store of them (read-only: tests copy)."""
    root = tmp_path_factory.mktemp("robust")
    model = tiny_models["5b"]
    data = _new_txt_dataset(root / "data", 4)
    store = root / "store"
    encode(data, model, store)
    return _Base(data=data, store=store, model=model, content=store_content(store))


class _Base(SimpleNamespace):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"base({self.data})"


# ---------------------------------------------------------------------------------------------------------
# helpers


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under `folder`, by relative path."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(Path(folder).rglob("*"))}


def assert_complete(store: Path, dataset: Path, expected: dict) -> None:
    """The store is committed, clean, holds one sample per dataset line (one clip each) and means exactly
    `expected`."""
    assert not list(store.glob("shards/*/.*.tar.tmp")), "temporary shards left behind"
    assert not (store / PENDING).exists(), "pending lists left behind"
    S.Manifest.load(store)
    rows = S.read_index(store)
    assert len({r["key"] for r in rows}) == len(rows), "duplicate sample keys"
    per_source = Counter(r["source"] for r in rows)
    assert per_source == Counter(read_lines(dataset / "videos.txt")), "a sample lost or duplicated"
    assert_same_content(store_content(store), expected)


def fresh_content(dataset: Path, model: Path, folder: Path) -> dict:
    store = Path(tempfile.mkdtemp(prefix="fresh-", dir=folder))
    encode(dataset, model, store)
    return store_content(store)


def _env(kill_at: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != KILL_HOOK}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if kill_at is not None:
        env[KILL_HOOK] = kill_at
    return env


def encode_args(dataset: Path, model: Path, store: Path, *extra: str) -> list[str]:
    return ["encode", str(dataset), "--model", str(model), "--out", str(store), "--buckets", str(TINY_BUCKETS),
            "--workers", "0", "--no-progress", *extra]


def cogprep_process(dataset: Path, model: Path, store: Path, *extra: str, kill_at: str | None = None):
    """`cogprep encode` in a subprocess through the console script; `kill_at` arms the SIGKILL test hook."""
    return subprocess.run([str(COGPREP), *encode_args(dataset, model, store, *extra)], env=_env(kill_at),
                          capture_output=True, text=True, timeout=600)


def assert_killed(proc) -> None:
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}, not killed:\n{proc.stderr[-3000:]}"


# ---------------------------------------------------------------------------------------------------------
# 1. bad inputs


def _damaged_mp4(path: Path) -> None:
    """An mp4 whose header is whole (moov first) but whose frame data is garbage: it probes, then fails to
    decode (a failure found while encoding, not while planning). decord decodes in threads: now and then the
    probe of the first frame fails too, and the item is refused while planning, for the same reason."""
    import imageio

    frames = (np.random.default_rng(7).random((20, SIZE, SIZE, 3)) * 255).astype(np.uint8)
    with imageio.get_writer(path, format="FFMPEG", mode="I", fps=8, codec="libx264", pixelformat="yuv420p",
                            macro_block_size=1, ffmpeg_log_level="error",
                            output_params=["-movflags", "+faststart"]) as writer:
        for frame in frames:
            writer.append_data(frame)
    data = bytearray(path.read_bytes())
    a, b = int(len(data) * 0.4), int(len(data) * 0.8)
    data[a:b] = np.random.default_rng(8).integers(0, 256, b - a, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _bad_corpus(root: Path, base_data: Path) -> tuple[Path, dict[str, list[str]]]:
    """The base dataset's four good clips mixed with one of each kind of bad input.

    Returns the dataset and, per bad source, substrings its reason in report.json must contain."""
    data = shutil.copytree(base_data, root / "bad-data")
    videos, prompts = read_lines(data / "videos.txt"), read_lines(data / "prompts.txt")
    good_bytes = (data / videos[0]).read_bytes()
    v = data / "videos"
    (v / "corrupt.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 6000, dtype=np.uint8).tobytes())
    (v / "truncated.mp4").write_bytes(good_bytes[: len(good_bytes) // 2])
    (v / "empty.mp4").write_bytes(b"")
    (v / "notes.mp4").write_text("shot list: beach, sunset, dog\n")
    write_video(v / "short.mp4", np.full((5, SIZE, SIZE, 3), 128, np.uint8), fps=8)
    _damaged_mp4(v / "damaged.mp4")
    write_video(v / "badcaption.mp4", np.full((FRAMES, SIZE, SIZE, 3), 60, np.uint8), fps=8)
    # the damaged clip is one that probes fine and fails only when its frames are decoded; decord decodes in
    # threads, and now and then its probe of the first frame meets the garbage too: then it is refused while
    # planning, with the same words the expected reason checks ("cannot decode")
    try:
        frames = read_video_info(v / "damaged.mp4").num_frames
    except CogtuneError as e:
        assert "damaged.mp4: cannot decode the first frame" in str(e), e
    else:
        assert frames == 20
        with pytest.raises(CogtuneError):
            read_frames(v / "damaged.mp4", list(range(9)))

    bad = [  # (video line, caption line as bytes)
        ("videos/corrupt.mp4", b"a red square moving up over a black background"),
        ("videos/truncated.mp4", b"a red square moving down over a black background"),
        ("videos/empty.mp4", b"a red square moving left to right over a black background"),
        ("videos/notes.mp4", b"a red square moving right to left over a black background"),
        ("videos/missing.mp4", b"a green circle moving up over a black background"),
        ("videos/short.mp4", b"a green circle moving down over a black background"),
        ("videos/damaged.mp4", b"a green circle moving left to right over a black background"),
        ("videos/badcaption.mp4", b"a green circle \xff\xfe moving over a black background"),
    ]
    lines = [(s, c.encode()) for s, c in zip(videos, prompts)] + bad
    (data / "videos.txt").write_text("\n".join(s for s, _ in lines) + "\n")
    (data / "prompts.txt").write_bytes(b"\n".join(c for _, c in lines) + b"\n")
    line = {s: n for n, s in enumerate([s for s, _ in lines], 1)}
    expected = {
        "videos/corrupt.mp4": ["corrupt.mp4", "not a readable video"],
        "videos/truncated.mp4": ["truncated.mp4", "not a readable video"],
        "videos/empty.mp4": ["empty.mp4", "empty file (0 bytes)"],
        "videos/notes.mp4": ["notes.mp4", "not a readable video"],
        "videos/missing.mp4": [f"videos.txt line {line['videos/missing.mp4']}", "videos/missing.mp4 not found"],
        "videos/short.mp4": ["short.mp4", "5 usable frames", "fewer than the smallest frame bucket (9)"],
        "videos/damaged.mp4": ["damaged.mp4", "cannot decode"],
        "videos/badcaption.mp4": [f"line {line['videos/badcaption.mp4']}", "caption is not valid UTF-8"],
    }
    return data, expected


@pytest.fixture
def bad_corpus(base, tmp_path):
    return _bad_corpus(tmp_path, base.data)


def test_bad_inputs_are_skipped_each_with_its_reason(base, bad_corpus, tmp_path):
    data, expected = bad_corpus
    store = tmp_path / "store"
    result = encode(data, base.model, store)  # exits 0
    rep = report(store)
    reasons = {item["source"]: item["reason"] for item in rep["skipped"]}
    assert len(rep["skipped"]) == len(reasons), "a bad item reported twice"
    assert set(reasons) == set(expected)
    for source, parts in expected.items():
        reason = reasons[source]
        assert "\n" not in reason
        for part in parts:
            assert part in reason, f"{source}: {part!r} not in {reason!r}"
        assert ".cc:" not in reason and "github" not in reason, f"decoder noise in {reason!r}"
    # every good item is in, exactly as a store of the good items alone
    assert rep["samples"] == len(S.read_index(store)) == 4
    assert_complete(store, base.data, base.content)
    assert f"skipped {len(expected)}" in result.output


def _assert_one_line_error(result) -> str:
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "--strict writes nothing" in errors[0]
    return errors[0]


def test_strict_refuses_bad_inputs_and_writes_nothing(base, bad_corpus, tmp_path):
    data, expected = bad_corpus
    # a store that did not exist (nor its parent) is not created
    new = tmp_path / "parent" / "store"
    result = encode(data, base.model, new, "--strict", expect=2)
    line = _assert_one_line_error(result)
    assert result.stderr.strip() == line and result.stdout.strip() == ""
    # planning finds all but the damaged clip (whose frames fail only once decoded, see _damaged_mp4)
    assert re.search(r"\(and (\d+) more bad items", line).group(1) in (str(len(expected) - 2), str(len(expected) - 1))
    assert not (tmp_path / "parent").exists()
    # a store that existed is left byte for byte as it was
    existing = shutil.copytree(base.store, tmp_path / "existing")
    before = snapshot(existing)
    _assert_one_line_error(encode(data, base.model, existing, "--strict", expect=2))
    assert snapshot(existing) == before


def test_strict_refuses_a_clip_that_fails_only_while_encoding(base, tmp_path):
    """The bad item is found after texts and other clips were encoded: still nothing may remain."""
    data = shutil.copytree(base.data, tmp_path / "data")
    add_clip(data, "extra.mp4", "a yellow square moving up over a blue background", frames=FRAMES, height=SIZE,
             width=SIZE, seed=5)
    _damaged_mp4(data / "videos" / "damaged.mp4")
    (data / "videos.txt").write_text((data / "videos.txt").read_text() + "videos/damaged.mp4\n")
    (data / "prompts.txt").write_text((data / "prompts.txt").read_text() + "an orange circle moving up\n")
    existing = shutil.copytree(base.store, tmp_path / "existing")
    before = snapshot(existing)
    line = _assert_one_line_error(encode(data, base.model, existing, "--strict", "--shard-max-items", "1",
                                         expect=2))
    assert "damaged.mp4" in line and "cannot decode" in line
    assert snapshot(existing) == before
    new = tmp_path / "new"
    _assert_one_line_error(encode(data, base.model, new, "--strict", "--shard-max-items", "1", expect=2))
    assert not new.exists()


def _error_line(result) -> str:
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def _without_caches(files: dict[str, bytes | None]) -> dict[str, bytes | None]:
    return {path: content for path, content in files.items() if not path.startswith(".cache")}


def _injected_bug(*args, **kwargs):
    raise TypeError("injected bug: an argument of the wrong type")


def _invoke(*args: str):
    """`cogprep ARGS` in this process, exceptions left to the result (the helper's `cogprep` asserts the code)."""
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bug_while_decoding_fails_the_encode_with_its_traceback(base, tmp_path, monkeypatch, workers):
    """A TypeError in the frame resizing is a bug, not bad input: the encode fails with it rather than skipping
    every clip and committing an empty store. A decode worker process (forked: it inherits the patch) passes it
    on too."""
    monkeypatch.setattr(C, "resize_to_bucket", _injected_bug)
    store = tmp_path / "store"
    result = _invoke(*encode_args(base.data, base.model, store), "--workers", str(workers))
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, TypeError), repr(result.exception)
    assert "injected bug" in str(result.exception)
    assert "_injected_bug" in "".join(traceback.format_exception(*result.exc_info)), "the traceback is lost"
    assert "skipped" not in result.output
    assert not (store / S.INDEX).exists()


def test_a_bug_while_planning_fails_the_encode(base, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "usable_frames", _injected_bug)
    store = tmp_path / "store"
    result = _invoke(*encode_args(base.data, base.model, store))
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, TypeError) and "injected bug" in str(result.exception)
    assert not store.exists()


def test_lists_of_different_lengths_are_refused_whole(base, tmp_path):
    """A caption missing in the middle of prompts.txt would pair every later clip with the next clip's caption:
    encode, status and extract-frames refuse the dataset, and write nothing."""
    data = shutil.copytree(base.data, tmp_path / "data")
    prompts = read_lines(data / "prompts.txt")
    del prompts[1]
    write_lines(data / "prompts.txt", prompts)
    existing = shutil.copytree(base.store, tmp_path / "existing")
    before = snapshot(existing)
    expected = f"{data / 'videos.txt'} has 4 lines but {data / 'prompts.txt'} has 3"
    for args in (encode_args(data, base.model, tmp_path / "new"), encode_args(data, base.model, existing),
                 ["status", str(data), "--store", str(existing)], ["extract-frames", str(data)]):
        result = _invoke(*args)
        assert result.exit_code == 2, f"{args[0]}: exit {result.exit_code}: {result.output}"
        assert expected in _error_line(result), args[0]
    assert not (tmp_path / "new").exists()
    assert snapshot(existing) == before
    assert not (data / "images.txt").exists() and not (data / "images").exists()


@pytest.mark.parametrize("kind", ["empty", "all bad"])
def test_an_encode_with_no_usable_sample_is_refused(base, tmp_path, kind):
    """An empty dataset, or one whose every entry is bad, exits 2 and writes no store (an existing one is left
    as it was) instead of committing an empty one."""
    data = tmp_path / "data"
    (data / "videos").mkdir(parents=True)
    if kind == "empty":
        (data / "videos.txt").write_text("")
        (data / "prompts.txt").write_text("")
        reason = "the dataset lists no samples"
    else:
        (data / "videos" / "corrupt.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 6000).tobytes())
        (data / "videos" / "empty.mp4").write_bytes(b"")
        (data / "videos.txt").write_text("videos/corrupt.mp4\nvideos/empty.mp4\n")
        (data / "prompts.txt").write_text(f"{CAPTIONS[0]}\n{CAPTIONS[1]}\n")
        reason = "all 2 entries of the dataset are bad"
    new = tmp_path / "new"
    line = _error_line(encode(data, base.model, new, expect=2))
    assert line.startswith(f"error: {data / 'videos.txt'}: ") and reason in line, line
    assert not new.exists()
    existing = shutil.copytree(base.store, tmp_path / "existing")
    before = snapshot(existing)
    encode(data, base.model, existing, expect=2)
    # the hash journal keeps what planning hashed (sources, not store content); everything else is as it was
    assert _without_caches(snapshot(existing)) == _without_caches(before)


def test_an_encode_whose_every_clip_fails_to_decode_is_refused(base, tmp_path, monkeypatch):
    """Every clip probes fine and fails only once decoded, after its caption was encoded: still no commit, and
    the shards this run wrote are removed."""
    def damaged(path, indices):
        raise CogtuneError(f"{path}: cannot decode frames (injected damage)")

    monkeypatch.setattr(C, "read_frames", damaged)
    existing = shutil.copytree(base.store, tmp_path / "existing")
    before = snapshot(existing)
    # float32 storage changes every item's key: every caption is encoded anew, every clip decoded anew
    line = _error_line(encode(base.data, base.model, existing, "--dtype", "float32", expect=2))
    assert f"{base.data / 'videos.txt'}: all 4 entries of the dataset are bad" in line
    assert "injected damage" in line
    assert _without_caches(snapshot(existing)) == _without_caches(before)
    new = tmp_path / "new"
    encode(base.data, base.model, new, expect=2)
    assert not new.exists()


# ---------------------------------------------------------------------------------------------------------
# 2. kill -9


@pytest.mark.slow
def test_kill_9_at_any_point_then_rerun_completes_the_store(base, tmp_path):
    model = base.model
    data = shutil.copytree(base.data, tmp_path / "data")
    store = tmp_path / "store"

    # (a) first encode into a new store, SIGKILLed after its 7th item: 4 captions (2 closed text shards of 2),
    # then 3 clips (one closed shard of 2, the third in an open shard)
    assert_killed(cogprep_process(data, model, store, "--shard-max-items", "2", kill_at="item:7"))
    assert not (store / S.INDEX).exists() and not (store / S.STORE_JSON).exists(), "nothing was committed"
    closed = S.list_shards(store)
    assert len([s for s in closed if s.startswith("shards/text/")]) == 2
    assert len([s for s in closed if not s.startswith("shards/text/")]) == 1
    assert len(list(store.glob("shards/*/.*.tar.tmp"))) == 1, "the open shard is a temporary file"

    # the re-run reuses the 4 captions and 2 clips of the closed shards and encodes the other 2 clips
    encode(data, model, store, "--shard-max-items", "2")
    assert report(store)["encoded"] == {"videos": 2, "texts": 0}
    assert_complete(store, data, base.content)

    # (b) an edit (one new clip, one new caption), then a run SIGKILLed after its first item: the store
    # that existed is intact
    before = snapshot(store)
    before_rows = S.read_index(store)
    add_clip(data, "clip4.mp4", "an orange square moving up over a green background", frames=FRAMES,
             height=SIZE, width=SIZE, seed=104)
    prompts = read_lines(data / "prompts.txt")
    prompts[1] = "a purple triangle moving down over a white background"
    (data / "prompts.txt").write_text("\n".join(prompts) + "\n")
    assert_killed(cogprep_process(data, model, store, kill_at="item:1"))
    after = snapshot(store)
    for path, content in before.items():
        if not path.startswith(".cache/"):
            assert after.get(path, b"gone") == content, f"{path} changed by a killed run"
    assert all(p.startswith(("shards/", ".cache/", f"{PENDING}/")) for p in after.keys() - before.keys())
    assert S.read_index(store) == before_rows
    assert_same_content(store_content(store), base.content)

    # (c) a run SIGKILLed between the index write (the commit) and the store.json write
    assert_killed(cogprep_process(data, model, store, kill_at="index"))
    rows = S.read_index(store)
    assert sorted(r["source"] for r in rows) == sorted(read_lines(data / "videos.txt"))
    assert (store / S.STORE_JSON).read_bytes() == before[S.STORE_JSON]
    # the manifest was committed inside the index with its rows: readers see the new one, not the stale copy
    assert sum(b["samples"] for b in S.Manifest.load(store).buckets) == len(rows) == 5

    # a normal re-run finds everything committed, encodes nothing and writes the manifest
    encode(data, model, store)
    assert report(store)["encoded"] == {"videos": 0, "texts": 0}
    assert sum(b["samples"] for b in S.Manifest.load(store).buckets) == 5
    assert_complete(store, data, fresh_content(data, model, tmp_path))


# ---------------------------------------------------------------------------------------------------------
# 3. torchrun


@pytest.mark.slow
def test_torchrun_two_processes_make_the_same_store_as_one(base, tmp_path):
    data = shutil.copytree(base.data, tmp_path / "data")
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(COGPREP),
           *encode_args(data, base.model, store, "--verbose")]
    proc = subprocess.run(cmd, env=_env(None), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_complete(store, data, base.content)
    rows = S.read_index(store)
    rank_of = re.compile(r"-r(\d+)-\d{5}\.tar$")
    assert {rank_of.search(r["shard"]).group(1) for r in rows} == {"0", "1"}, "both ranks encode clips"
    assert {rank_of.search(r["text_shard"]).group(1) for r in rows} == {"0", "1"}, "both ranks encode captions"
    # rank 0 alone commits and reports, and counts the work of every rank
    assert report(store)["encoded"] == {"videos": 4, "texts": 4}
    assert proc.stdout.count("encoded 4 clips and 4 captions") == 1, proc.stdout
    # and it alone says anything, --verbose's detail included: no rank guard of the commands' own needed
    assert proc.stdout.count("┃ bucket") == 1, proc.stdout  # the summary table's header
    assert proc.stdout.count("cogprep: to encode: 4 clips and 4 captions, split over 2 processes") == 1, proc.stdout
    assert "cogprep [rank 1]" not in proc.stdout + proc.stderr
    assert not list(store.glob(f".{S.INDEX}.*"))


@pytest.mark.slow
def test_two_nodes_make_the_same_store_as_one_process(base, tmp_path):
    """Two torchrun launches acting as two nodes of 2 processes each (a static rendezvous on this machine):
    the 4 ranks split the work by global rank, their shard names never collide, node 0's rank 0 commits once."""
    data = shutil.copytree(base.data, tmp_path / "data")
    store = tmp_path / "store"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                               "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(COGPREP), *encode_args(data, base.model, store)],
                              env={**_env(None), "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-4000:]
    assert_complete(store, data, base.content)
    rows = S.read_index(store)
    rank_of = re.compile(r"-r(\d+)-\d{5}\.tar$")
    shards = [r[column] for r in rows for column in ("shard", "text_shard")]
    assert {rank_of.search(shard).group(1) for shard in shards} == {"0", "1", "2", "3"}, "every rank encodes"
    # one commit, by the first node's rank 0, counting every rank's work
    assert report(store)["encoded"] == {"videos": 4, "texts": 4}
    assert [out.count("encoded 4 clips and 4 captions") for out, _ in outputs] == [1, 0], outputs
    assert not (store / PENDING).exists() and not list(store.glob(f".{S.INDEX}.*"))


# ---------------------------------------------------------------------------------------------------------
# 4. random edits, incremental vs from scratch

_fresh_ids = itertools.count()
EDITS = ("add", "replace", "caption", "delete", "duplicate")


def _fresh_caption() -> str:
    return f"a red circle moving up over a blue background take {next(_fresh_ids)}"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _keys(data: Path, entries: list[tuple[str, str]]) -> tuple[set[str], set[str]]:
    """Video keys (file contents: every clip has one window at one bucket) and text keys (captions)."""
    return {_sha(data / s) for s, _ in entries}, {c for _, c in entries}


def _apply(data: Path, entries: list[tuple[str, str]], edit: str, pick: int) -> None:
    """Apply one edit to the txt dataset. Every new content and caption is one never seen before."""
    i = pick % len(entries)
    if edit == "delete" and len(entries) == 1:
        edit = "caption"
    if edit == "add":
        name = f"videos/new{next(_fresh_ids)}.mp4"
        add_clip(data, Path(name).name, "x", frames=FRAMES, height=SIZE, width=SIZE, seed=next(_fresh_ids) + 10**6)
        entries.append((name, _fresh_caption()))
    elif edit == "replace":  # new bytes written into the same file
        tmp = data / "replacement.mp4"
        frames = (np.random.default_rng(next(_fresh_ids) + 10**6).random((FRAMES, SIZE, SIZE, 3)) * 255)
        write_video(tmp, frames.astype(np.uint8), fps=8)
        with open(data / entries[i][0], "wb") as f:
            f.write(tmp.read_bytes())
        tmp.unlink()
    elif edit == "caption":
        entries[i] = (entries[i][0], _fresh_caption())
    elif edit == "delete":
        source, _ = entries.pop(i)
        if source not in {s for s, _ in entries}:
            (data / source).unlink()
    elif edit == "duplicate":
        entries.append((entries[i][0], _fresh_caption()))
    (data / "videos.txt").write_text("".join(f"{s}\n" for s, _ in entries))
    (data / "prompts.txt").write_text("".join(f"{c}\n" for _, c in entries))


@pytest.mark.slow
@settings(max_examples=5, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from(EDITS), st.integers(0, 1000)), min_size=2, max_size=3))
def test_incremental_after_random_edits_equals_from_scratch(base, tmp_path_factory, edits):
    root = tmp_path_factory.mktemp("edits")
    data = _new_txt_dataset(root / "data", 2)
    store = root / "store"
    encode(data, base.model, store)
    entries = list(zip(read_lines(data / "videos.txt"), read_lines(data / "prompts.txt")))
    for edit, pick in edits:
        videos_before, texts_before = _keys(data, entries)
        _apply(data, entries, edit, pick)
        videos_after, texts_after = _keys(data, entries)
        encode(data, base.model, store)
        expected = {"videos": len(videos_after - videos_before), "texts": len(texts_after - texts_before)}
        assert report(store)["encoded"] == expected, f"after {edit}"
        assert_complete(store, data, fresh_content(data, base.model, root))
