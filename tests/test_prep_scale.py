"""The no-op re-run at scale keeps every content key: planning after the batched rewrite gives the same rows,
keys and changes as the code before it (commit BEFORE) did, and still sees every edit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cogtune.preprocess import plan as P
from cogtune.preprocess.datasets import read_columns, read_dataset
from cogtune.preprocess.frames import FrameSampling
from cogtune.preprocess.plan import EncodeSettings, _Keys, plan_against_store, text_key
from cogtune.preprocess.staleness import Current, columns_of, current_by_columns, dataset_changes
from cogtune.shared import store as S
from cogtune.shared.fingerprint import FileHashes, Resolver, hash_bytes_of_file, hash_json
from prep_helpers import add_clip, encode, read_lines, write_lines

REPO = Path(__file__).parents[1]
BEFORE = "d402860"
"""The last commit whose planner was per-entry Python objects: the reference for the keys and the plan."""
SCRIPTS = REPO / "scripts"


@pytest.fixture
def dataset(demo_txt, tmp_path):
    """A private copy of the demo dataset that a test may edit."""
    return shutil.copytree(demo_txt, tmp_path / "data")


def _plan_json(plan) -> dict:
    return {"samples": plan.samples, "changes": plan.changes, "video_jobs": sorted(plan.video_jobs),
            "text_jobs": plan.text_jobs, "bad": [[b.source, b.reason] for b in plan.bad]}


def _head_plan(dataset: Path, store: Path, tmp_path: Path) -> dict | None:
    """The plan the code at commit BEFORE makes (its own package, extracted with git archive, in a new process);
    None where git or that commit is not at hand."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None
    head = tmp_path / "head"
    (head / "cogtune").mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE], capture_output=True, check=False)
    if archive.returncode != 0:
        return None
    archive = archive.stdout
    subprocess.run(["tar", "-x", "-C", str(head / "cogtune")], input=archive, check=True)
    code = ("import json, sys; from pathlib import Path; import cogtune.preprocess.plan as P\n"
            "assert not hasattr(P, 'KnownItems'), 'not the planner before batching'\n"
            "p = P.plan_against_store(Path(sys.argv[1]), Path(sys.argv[2]))\n"
            "print(json.dumps({'samples': p.samples, 'changes': p.changes, 'video_jobs': sorted(p.video_jobs),"
            " 'text_jobs': p.text_jobs, 'bad': [[b.source, b.reason] for b in p.bad]}))")
    done = subprocess.run([sys.executable, "-c", code, str(dataset), str(store)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(head)}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_keys_are_hash_json_of_the_same_lists():
    settings = EncodeSettings(buckets={"resolutions": [[32, 48]], "frames": [9]},
                              sampling=FrameSampling(fps=8.0), resize="crop", image_noise_variants=2, seed=3)
    keys = _Keys(settings, "vaefp", "textfp")
    item_settings = [settings.resize, {**settings.sampling.__dict__}, "vaefp", settings.dtype, 2, 3]
    for caption in ("a cat", 'quotes " and \\ backslash', "ünïcödé 猫 \u2028", ""):
        assert keys.text(caption) == text_key(caption, "textfp", settings) == hash_json(
            ["text", caption, "textfp", settings.text_length, settings.dtype])
    for start, stride, frames in ((0, 1.0, 9), (12, 1.875, 49), (3, 2, 17), (0, 0.1 + 0.2, 1)):
        window, sample = _Keys.window(start, stride, frames, f"{frames}x32x48")
        vkey = keys.video("d" * 32, window)
        assert vkey == hash_json(["video", "d" * 32, start, stride, frames, f"{frames}x32x48", *item_settings])
        assert _Keys.sample("vidéos/a b.mp4", sample, vkey, "t" * 32) == hash_json(
            ["vidéos/a b.mp4", start, stride, f"{frames}x32x48", vkey, "t" * 32])


def test_resolver_gives_realpath_and_stat(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.mp4").write_bytes(b"x" * 5)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "b.mp4").symlink_to(tmp_path / "real" / "a.mp4")
    resolver = Resolver()
    for path in ("link/a.mp4", "real/./a.mp4", "real/../real/a.mp4", "link/b.mp4", "real/b.mp4", "real//a.mp4"):
        full = f"{tmp_path}/{path}"
        real, st = resolver.stat(full)
        assert real == os.path.realpath(full) and st.st_ino == os.stat(full).st_ino
        assert resolver.as_path(real) == Path(real) and str(resolver.as_path(real)) == real
        assert resolver.as_path(real).parts == Path(real).parts
    with pytest.raises(FileNotFoundError):
        resolver.stat(f"{tmp_path}/real/missing.mp4")


@pytest.mark.slow
def test_noop_plan_equals_the_plan_before_batching_and_edits_are_seen(dataset, tiny_models, tmp_path):
    store, model = tmp_path / "store", tiny_models["5b"]
    videos, prompts = read_lines(dataset / "videos.txt"), read_lines(dataset / "prompts.txt")
    # the same clip listed twice with its caption, and once with another: duplicates and shared items
    write_lines(dataset / "videos.txt", [*videos, videos[0], videos[0]])
    write_lines(dataset / "prompts.txt", [*prompts, prompts[0], "another caption for the first clip"])
    encode(dataset, model, store)

    plan = plan_against_store(dataset, store)
    rows = S.read_index(store)
    assert sorted(r["key"] for r in plan.samples) == sorted(r["key"] for r in rows)
    assert {k: len(v) for k, v in plan.changes.items()} == {"new": 0, "changed": 0, "removed": 0,
                                                           "unchanged": len({r["source"] for r in rows})}
    assert not plan.video_jobs and not plan.text_jobs and not plan.stale
    # the locations made on demand are those of the index rows
    for r in rows:
        video, text = S.row_locations(r)
        assert plan.video_locations[r["video_key"]] == video
        assert plan.text_locations[r["text_key"]] == (text, r["text_tokens"])
    for r in plan.samples:  # every key, recomputed with hash_json from its parts
        assert r["text_key"] == hash_json(["text", r["caption"], *_text_parts(store)])
    head = _head_plan(dataset, store, tmp_path)
    if head is not None:
        assert _plan_json(plan) == head

    # edits: a caption, a clip replaced by other bytes of the same size with a new mtime, a removed entry
    prompts = read_lines(dataset / "prompts.txt")
    prompts[1] = "a yellow triangle moving right over a grey background"
    first = dataset / read_lines(dataset / "videos.txt")[2]
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the coded frames: the header still probes
    stat = first.stat()
    first.write_bytes(bytes(data))
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    videos = read_lines(dataset / "videos.txt")
    removed = videos[3]
    write_lines(dataset / "videos.txt", videos[:3] + videos[4:])
    write_lines(dataset / "prompts.txt", prompts[:3] + prompts[4:])
    plan = plan_against_store(dataset, store)
    assert plan.changes["removed"] == [removed]
    assert set(plan.changes["changed"]) == {videos[1], videos[2]}, plan.changes
    assert len(plan.video_jobs) == 1 and list(plan.text_jobs.values()) == [prompts[1]]
    assert plan.stale
    head = _head_plan(dataset, store, tmp_path / "again")
    if head is not None:
        assert _plan_json(plan) == head


def _text_parts(store: Path) -> list:
    from cogtune.preprocess.plan import text_fingerprint

    manifest = S.Manifest.load(store)
    return [text_fingerprint(manifest.model["fingerprints"]), manifest.settings["text_length"],
            manifest.settings["dtype"]]


@pytest.mark.slow
def test_bench_scale_smoke(tmp_path):
    result = tmp_path / "bench.json"
    work = tmp_path / "work"
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_scale.py"), "--entries", "2000", "--json-out",
                           str(result), "--keep", str(work)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(result.read_text())
    run = measured["runs"][0]
    assert run["entries"] == 2000 and run["unchanged"] == 2000
    assert run["status_in_process_s"] > 0 and run["peak_rss_gb"] > 0 and run["one_stat_per_entry_s"] > 0
    start = run["trainer_start"]
    assert start["batches_per_epoch"] == 2000 and start["check_s"] > 0 and start["index_load_s"] > 0
    assert 0 < start["index_memory_mb"] <= start["index_and_sampler_memory_mb"]
    assert start["check_read_columns_s"] > 0 and start["check_comparison_s"] > 0 and start["baseline_anti_joins_s"] > 0
    assert run["maintenance"]["inspect_s"] > 0 and run["maintenance"]["gc_dry_run_s"] > 0
    assert "a million clips: no-op re-run" in done.stdout and "cogtrain start" in done.stdout
    # one edit in the store: each encode did exactly that item (the bench itself refuses otherwise)
    edits = run["edits"]
    assert edits["noop_encode"]["changes"] == {"new": 0, "changed": 0, "removed": 0, "unchanged": 2000}
    assert (edits["noop_encode"]["encoded_videos"], edits["noop_encode"]["encoded_texts"]) == (0, 0)
    for name, clips, captions in (("caption_edit", 0, 1), ("clip_replaced", 1, 0), ("one_item_encode", 1, 1)):
        assert (edits[name]["encoded_videos"], edits[name]["encoded_texts"]) == (clips, captions), name
        assert edits[name]["cpu_s"] > 0
    assert edits["caption_edit"]["changes"]["changed"] == edits["clip_replaced"]["changes"]["changed"] == 1
    assert "one caption edited: encode (0 clips, 1 caption)" in done.stdout
    assert not list(work.glob("edits-*"))  # the edits worked on a copy, removed after
    assert pq.read_metadata(work / "store-2000" / S.INDEX).num_rows == 2000  # the kept store as built
    # the cost per entry, one column per size
    assert set(run["per_entry_cpu_us"]) >= {"status, in process", "no-op cogprep encode", "cogprep inspect"}
    assert run["per_entry_cpu_us"]["status, in process"] == pytest.approx(run["status_cpu_s"] * 1e6 / 2000, abs=0.01)
    assert "CPU microseconds per entry as the dataset grows" in done.stdout


def test_bench_scale_mirror_keeps_every_real_path_and_replaces_one_clip(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_scale
    data = tmp_path / "data"
    for i in range(4):
        clip = data / "videos" / f"{i // 2:04d}" / f"{i}.mp4"
        clip.parent.mkdir(parents=True, exist_ok=True)
        clip.write_bytes(b"clip %d" % i)
    write_lines(data / "videos.txt", [f"videos/{i // 2:04d}/{i}.mp4" for i in range(4)])
    write_lines(data / "prompts.txt", [f"caption {i}" for i in range(4)])
    mirror = bench_scale.mirror_dataset(data, tmp_path / "mirror")
    for line in read_lines(mirror / "videos.txt"):
        assert os.path.realpath(mirror / line) == os.path.realpath(data / line)
    bench_scale.replace_clip(data, mirror, "videos/0001/3.mp4", seed=1)
    assert (mirror / "videos/0001/3.mp4").read_bytes()[4:8] == b"ftyp"  # a real mp4 of its own
    assert os.path.realpath(mirror / "videos/0001/2.mp4") == os.path.realpath(data / "videos/0001/2.mp4")
    assert os.path.realpath(mirror / "videos/0000/0.mp4") == os.path.realpath(data / "videos/0000/0.mp4")
    assert (data / "videos/0001/3.mp4").read_bytes() == b"clip 3"  # the original left as it was


# ---------------------------------------------------------------------------------------------------------
# the staleness check by columns (preprocess/staleness.py)


def _plan_counts(dataset: Path, store: Path) -> dict[str, int]:
    return {kind: len(sources) for kind, sources in plan_against_store(dataset, store).changes.items()}


def _edit_caption(data: Path, store: Path) -> None:
    prompts = read_lines(data / "prompts.txt")
    write_lines(data / "prompts.txt", [prompts[0] + " at dusk", *prompts[1:]])


def _touch_a_clip(data: Path, store: Path) -> None:
    """The same bytes with a new mtime: the plan re-hashes it and finds it unchanged."""
    clip = data / read_lines(data / "videos.txt")[1]
    st = clip.stat()
    os.utime(clip, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def _remove_an_entry(data: Path, store: Path) -> None:
    write_lines(data / "videos.txt", read_lines(data / "videos.txt")[1:])
    write_lines(data / "prompts.txt", read_lines(data / "prompts.txt")[1:])


def _add_a_clip(data: Path, store: Path) -> None:
    add_clip(data, "extra.mp4", "a green square moving up over a black background")


def _list_a_short_clip(data: Path, store: Path) -> None:
    """A clip too short for any bucket: the plan skips it (bad), it is no change."""
    add_clip(data, "short.mp4", "a clip of two frames", frames=2)


def _record_damage(data: Path, store: Path) -> None:
    row = S.read_index(store)[0]
    S.write_damaged(store, {row["video_key"]: "gzip CRC"}, [])


@pytest.mark.slow
@pytest.mark.parametrize("edit", [_edit_caption, _touch_a_clip, _remove_an_entry, _add_a_clip, _list_a_short_clip,
                                  _record_damage])
def test_what_the_columns_cannot_call_current_the_plan_decides(demo_txt, demo_store, tmp_path, edit):
    data = shutil.copytree(demo_txt, tmp_path / "data")  # copy2: the same mtimes, so the store is current for it
    store = shutil.copytree(demo_store, tmp_path / "store")
    edit(data, store)
    assert current_by_columns(data, store) is None
    assert dataset_changes(data, store) == _plan_counts(data, store)


def test_a_current_store_is_told_by_columns_alone(demo_txt, demo_store, tmp_path, monkeypatch):
    data = shutil.copytree(demo_txt, tmp_path / "data")
    videos, prompts = read_lines(data / "videos.txt"), read_lines(data / "prompts.txt")
    plan = plan_against_store(data, demo_store)
    expected = {kind: len(sources) for kind, sources in plan.changes.items()}
    assert expected["unchanged"] == len(videos) and not plan.stale
    # one entry listed twice (one sample in the index), and a line the reader refuses (a bad item, no change)
    write_lines(data / "videos.txt", [*videos, videos[0], "missing.mp4"])
    write_lines(data / "prompts.txt", [*prompts, prompts[0], "a caption of a missing clip"])
    assert current_by_columns(data, demo_store) == Current(unchanged=len(videos), bad=1)
    assert len(plan_against_store(data, demo_store).bad) == 1
    # a dataset cogprep encode has read already answers the same, as the reader's own columns
    read, columns = read_dataset(data), read_columns(data)
    given = columns_of(read)
    assert (given.source, given.caption, given.kind, given.real, given.line, given.bad, given.image) == (
        columns.source, columns.caption, columns.kind, columns.real, columns.line, columns.bad, columns.image)
    assert (given.size == columns.size).all() and (given.mtime_ns == columns.mtime_ns).all()
    assert current_by_columns(data, demo_store, columns=given) == Current(unchanged=len(videos), bad=1)
    recorded = S.Manifest.load(demo_store).model["fingerprints"]
    assert current_by_columns(data, demo_store, {**recorded, "vae": "another"}) is None
    assert current_by_columns(data, demo_store, dict(recorded)) is not None

    def no_plan(*args, **kwargs):
        raise AssertionError("the full plan ran")

    monkeypatch.setattr(P, "plan_against_store", no_plan)
    assert dataset_changes(data, demo_store) == expected


# ---------------------------------------------------------------------------------------------------------
# first-encode hashing: on threads, journaled as each hash finishes


def _files(folder: Path, count: int) -> list[tuple[str, os.stat_result]]:
    folder.mkdir()
    for i in range(count):
        (folder / f"{i}.mp4").write_bytes(os.urandom(1000 + i))
    return [(str(p), p.stat()) for p in sorted(folder.iterdir())]


def test_hash_files_on_threads_journals_each_hash_for_the_next_run(tmp_path, capsys):
    files = _files(tmp_path / "clips", 40)
    cache = tmp_path / "cache" / "files.json"
    hashes = FileHashes(cache)
    hashes.hash_files(files, workers=4, progress=True, journal=True)
    assert "hashing" in capsys.readouterr().err  # the progress bar (tqdm: files/s and the time left)
    assert hashes.stats["hashed"] == 40
    for real, _ in files:
        assert hashes.entries[real][2] == hash_bytes_of_file(Path(real))
    # no save: as a killed run leaves it; the next run reads the journal and hashes nothing again
    again = FileHashes(cache)
    again.hash_files(files, journal=True)
    assert again.stats["hashed"] == 0 and again.entries == hashes.entries
    assert all(again.hash_and_stat(real, (real, st))[0] == hashes.entries[real][2] for real, st in files)
    assert again.stats == {"hashed": 0, "trusted": 40}
    again.save()  # the journal is folded into the cache
    assert not again.journal_path.exists() and json.loads(cache.read_text()) == hashes.entries
    # a file changed since: hashed anew, the rest trusted
    Path(files[0][0]).write_bytes(b"other bytes")
    files[0] = (files[0][0], Path(files[0][0]).stat())
    third = FileHashes(cache)
    third.hash_files(files)
    assert third.stats["hashed"] == 1 and third.entries[files[0][0]][2] == hash_bytes_of_file(Path(files[0][0]))


KILLED_HASHING = """
import os, signal, sys
from pathlib import Path
from cogtune.shared import fingerprint
calls = 0
real_hash = fingerprint.hash_bytes_of_file
def hash_then_die(path):
    global calls
    calls += 1
    if calls == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_hash(path)
fingerprint.hash_bytes_of_file = hash_then_die
files = [(str(p), p.stat()) for p in sorted(Path(sys.argv[1]).iterdir())]
fingerprint.FileHashes(Path(sys.argv[3])).hash_files(files, workers=1, journal=True)
"""


def test_kill_9_while_hashing_loses_no_finished_hash(tmp_path):
    files = _files(tmp_path / "clips", 30)
    cache = tmp_path / "cache" / "files.json"
    done = subprocess.run([sys.executable, "-c", KILLED_HASHING, str(tmp_path / "clips"), "13", str(cache)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr[-2000:]
    survivor = FileHashes(cache)
    assert len(survivor.entries) == 12  # every hash finished before the kill (one thread: calls 1 to 12)
    survivor.hash_files(files)
    assert survivor.stats["hashed"] == 18  # the next run hashes only the rest
    assert all(survivor.entries[real][2] == hash_bytes_of_file(Path(real)) for real, _ in files)
