"""The columnar dataset reader and the staleness check built on it: the same answers as the per-entry reader and
the full plan, with only the sources that differ planned, and a bounded memory per entry."""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from cogtune.preprocess import plan as P
from cogtune.preprocess.datasets import read_columns, read_dataset
from cogtune.preprocess.staleness import current_by_columns, store_changes
from cogtune.shared.video import read_frames
from PIL import Image
from prep_helpers import add_clip, read_lines, write_lines


def _spy_plans(monkeypatch) -> list[int]:
    """The number of entries each plan is given, from here on."""
    sizes: list[int] = []
    plan_encode = P.plan_encode

    def counting(dataset, *args, **kwargs):
        sizes.append(len(dataset.items))
        return plan_encode(dataset, *args, **kwargs)

    monkeypatch.setattr(P, "plan_encode", counting)
    return sizes


def _answers(found) -> dict:
    return {**found.changes, "unchanged": found.unchanged, "video_jobs": found.video_jobs,
            "text_jobs": found.text_jobs, "bad": found.bad}


def _full_plan(dataset: Path, store: Path) -> dict:
    plan = P.plan_against_store(dataset, store)
    return {**{kind: plan.changes[kind] for kind in ("new", "changed", "removed")},
            "unchanged": len(plan.changes["unchanged"]), "video_jobs": len(plan.video_jobs),
            "text_jobs": len(plan.text_jobs), "bad": len(plan.bad)}


def _write_image(path: Path, frame: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame).save(path)


@pytest.mark.slow
def test_columns_and_the_full_plan_agree_on_every_kind_of_edit(demo_txt, demo_store, tmp_path, monkeypatch):
    data = shutil.copytree(demo_txt, tmp_path / "data")  # copy2: the same mtimes, so the store is current for it
    store = shutil.copytree(demo_store, tmp_path / "store")
    videos, prompts = read_lines(data / "videos.txt"), read_lines(data / "prompts.txt")
    assert current_by_columns(data, store) is not None
    prompts[0] += " at dusk"  # a caption edit
    # a clip replaced by another (new content, size and mtime), and one touched (same bytes, new mtime)
    shutil.copyfile(data / videos[4], data / videos[1])
    st = (data / videos[2]).stat()
    os.utime(data / videos[2], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    # a removed line, a missing file, and an image (a 1-frame sample for this text-to-video model)
    videos, prompts = videos[:3] + videos[4:], prompts[:3] + prompts[4:]
    _write_image(data / "stills/first.png", read_frames(data / videos[0], [0])[0])
    write_lines(data / "videos.txt", [*videos, "videos/missing.mp4", "stills/first.png"])
    write_lines(data / "prompts.txt", [*prompts, "a clip that is not there", "a still of the first clip"])
    add_clip(data, "extra.mp4", "a green square moving up over a black background")  # an added line

    planned = _spy_plans(monkeypatch)
    found = _answers(store_changes(data, store))
    expected = _full_plan(data, store)
    assert found == expected
    assert expected["new"] == ["stills/first.png", "videos/extra.mp4"] and len(expected["removed"]) == 1
    assert len(expected["changed"]) == 2 and expected["unchanged"] == 2 and expected["bad"] == 1
    # caption edit, replaced, touched, image, added: planned; the one untouched clip was not
    assert planned == [5, len(videos) + 2]


@pytest.mark.slow
def test_an_image_to_video_store_agrees_with_the_full_plan(train_dataset, i2v_train_store, tmp_path, monkeypatch):
    data = shutil.copytree(train_dataset, tmp_path / "data")
    store = shutil.copytree(i2v_train_store, tmp_path / "store")
    videos, prompts = read_lines(data / "videos.txt"), read_lines(data / "prompts.txt")
    # an image entry, which an image-to-video model skips (a bad item, no change), and an edited caption
    _write_image(data / "stills/first.png", read_frames(data / videos[0], [0])[0])
    write_lines(data / "videos.txt", [*videos, "stills/first.png"])
    write_lines(data / "prompts.txt", [prompts[0] + " slowly", *prompts[1:], "a still"])
    planned = _spy_plans(monkeypatch)
    expected = _full_plan(data, store)
    assert _answers(store_changes(data, store)) == expected
    assert expected["changed"] == [videos[0]] and expected["bad"] == 1 and expected["unchanged"] == len(videos) - 1
    assert planned == [len(videos) + 1, 1]
    # first-frame images from images.txt: the index does not break out their hash, so every entry is planned
    for i, video in enumerate(videos):
        _write_image(data / f"first/{i}.png", read_frames(data / video, [0])[0])
    write_lines(data / "images.txt", [f"first/{i}.png" for i in range(len(videos))] + [""])
    planned.clear()
    assert _answers(store_changes(data, store)) == _full_plan(data, store)
    assert planned == [len(videos), len(videos)]


def _listed_dataset(folder: Path, count: int) -> Path:
    """`count` empty clips listed in a txt dataset, 500 per folder."""
    names = [f"v/{i // 500}/{i}.mp4" for i in range(count)]
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()
    write_lines(folder / "videos.txt", names)
    write_lines(folder / "prompts.txt", [f"a caption of clip number {i}" for i in range(count)])
    return folder


def _peak_bytes(read) -> int:
    tracemalloc.start()
    try:
        kept = read()
        return tracemalloc.get_traced_memory()[1], kept
    finally:
        tracemalloc.stop()


def test_the_columns_hold_a_bounded_memory_per_entry(tmp_path):
    count = 4000
    data = _listed_dataset(tmp_path / "data", count)
    peak, columns = _peak_bytes(lambda: read_columns(data))
    assert len(columns) == count and columns.size.dtype == np.int64
    items_peak, dataset = _peak_bytes(lambda: read_dataset(data))
    assert [i.source for i in dataset.items] == columns.source
    # the lists of strings and two int64 arrays, and the file texts and their lines while they are split (about
    # 500 bytes an entry here); a DatasetItem and its Path on top of that come to about 850
    assert peak / count < 700, f"{peak / count:.0f} bytes per entry"
    assert peak < 0.7 * items_peak, (peak, items_peak)


def test_the_item_reader_is_the_columns_made_items(tmp_path):
    data = _listed_dataset(tmp_path / "data", 3)
    write_lines(data / "videos.txt", [*read_lines(data / "videos.txt"), "v/0/missing.mp4", "v/0/1.mp4"])
    write_lines(data / "prompts.txt", [*read_lines(data / "prompts.txt"), "gone", "  the  same clip\tagain "])
    columns, dataset = read_columns(data, id_token="TOK"), read_dataset(data, id_token="TOK")
    assert [b.reason for b in columns.bad] == [b.reason for b in dataset.bad] == [
        "videos.txt line 4: v/0/missing.mp4 not found"]
    assert columns.caption[-1] == "TOK the same clip again" and columns.line == [1, 2, 3, 5]
    assert [(i.source, str(i.path), i.caption, i.kind, i.line, i.stat.st_size, i.stat.st_mtime_ns)
            for i in dataset.items] == [
        (s, r, c, k, n, int(z), int(m)) for s, r, c, k, n, z, m in zip(
            columns.source, columns.real, columns.caption, columns.kind, columns.line, columns.size,
            columns.mtime_ns)]
    assert str(dataset.items[0].path) == os.path.realpath(data / "v/0/0.mp4")


def test_the_kind_of_an_entry_is_pathlibs_suffix_rule():
    from cogtune.preprocess.datasets import _is_image, _kinds
    from cogtune.shared.video import is_image

    written = ["a.mp4", "a.PNG", "d/x.png", "d.png/x", ".png", "d/.png", "a..png", "x.", "d/x.jpg/", "a/b/c", "",
               ".", "..", "a/..", "a.b.jpeg", "/x.webp", "x/.y.png", "a.png.mp4", "~/.png", "p", "png", "d/x.",
               "x.png/.", "1.png", "2.png", "1.mp4"]
    assert [_is_image(w) for w in written] == [is_image(w) for w in written]
    assert sum(_is_image(w) for w in written) == 10
    # the column of kinds: decided once per tail, each the same as for the entry alone
    assert _kinds(written) == ["image" if is_image(w) else "video" for w in written]
    # no image suffix written anywhere: all videos at once; one written in any case, or in a non-ASCII list: by tail
    for sources in (["a.mp4", "d/x.mov", "png", "d.pn/g", ""], ["a.mp4", "b.JPeG"], ["a.mp4", "é.png"]):
        assert _kinds(sources) == ["image" if is_image(w) else "video" for w in sources]


def test_status_fingerprints_the_model_from_its_own_small_cache(demo_txt, demo_store, tiny_models, tmp_path,
                                                                monkeypatch):
    """The model's file hashes live in their own cache: status on a current store never parses the dataset's
    (a million entries at scale); a store from before the split falls back to the dataset's cache once, trusting
    the same (size, mtime), and keeps what it found."""
    from cogtune.shared import fingerprint as F
    from cogtune.shared import store as S
    from prep_helpers import cogprep

    store = shutil.copytree(demo_store, tmp_path / "store")
    cache = store / S.CACHE_DIR
    model_files = json.loads((cache / F.MODEL_FILES_CACHE).read_text())
    dataset_files = json.loads((cache / F.FILES_CACHE).read_text())
    model = str(tiny_models["5b"].resolve())
    assert model_files and all(path.startswith(model + "/") for path in model_files)
    assert dataset_files and not any(path.startswith(model + "/") for path in dataset_files)
    read: list[str] = []
    read_cache = F._read_cache
    monkeypatch.setattr(F, "_read_cache", lambda path: read.append(path.name) or read_cache(path))

    def no_hashing(path):
        raise AssertionError(f"{path} hashed: its cached hash was not trusted")

    monkeypatch.setattr(F, "hash_bytes_of_file", no_hashing)
    assert "store is current" in cogprep("status", demo_txt, "--store", store).output
    assert read == [F.MODEL_FILES_CACHE]
    # a store written before the split: the model's hashes are in the dataset's cache
    (cache / F.MODEL_FILES_CACHE).unlink()
    (cache / F.FILES_CACHE).write_text(json.dumps({**dataset_files, **model_files}))
    read.clear()
    assert "store is current" in cogprep("status", demo_txt, "--store", store).output
    assert read == [F.MODEL_FILES_CACHE, F.FILES_CACHE]
    assert json.loads((cache / F.MODEL_FILES_CACHE).read_text()) == model_files
    read.clear()
    assert "store is current" in cogprep("status", demo_txt, "--store", store).output
    assert read == [F.MODEL_FILES_CACHE]


def test_the_columns_take_only_entries_the_rules_find_no_problem_with(tmp_path):
    """The reader takes the common entry as one stat finds it and judges the rest one by one
    (`_entry_problem`): each entry, of every kind either way may meet, gets the rules' own answer."""
    from cogtune.preprocess.datasets import _entry_problem, _kinds
    from cogtune.shared.fingerprint import Resolver

    data = tmp_path / "data"
    (data / "v").mkdir(parents=True)
    for name in ("a.mp4", "b.mp4", "é.mp4", "still.png"):
        (data / "v" / name).write_bytes(name.encode() * 10)
    (data / "link.mp4").symlink_to(data / "v" / "a.mp4")
    (data / "linked").symlink_to(data / "v")
    (data / "folder.mp4").mkdir()
    (data / "~home.mp4").write_bytes(b"x")
    entries = [(b"v/a.mp4", b"a clip"), (b"link.mp4", b"a link"), (b"linked/b.mp4", b"through a linked folder"),
               (b"folder.mp4", b"a folder"), (b"v/missing.mp4", b"gone"), (b"v/b.mp4", b"   "),
               (b"~home.mp4", b"a tilde"), (b"v/a.mp4", b"bad \xff bytes"), (b"v/\xff.mp4", b"a bad path"),
               ("v/é.mp4".encode(), "un café".encode()), (str(data / "v/b.mp4").encode(), b"absolute"),
               (b"./v/../v/b.mp4", b"dots"), (b"v/still.png", b"  a  still\t"), (b"v/", b"a slash"), (b"", b"none")]
    (data / "videos.txt").write_bytes(b"".join(path + b"\n" for path, _ in entries))
    (data / "prompts.txt").write_bytes(b"".join(caption + b"\n" for _, caption in entries))
    columns = read_columns(data)
    sources = [path.decode("utf-8", "surrogateescape").strip() for path, _ in entries]
    captions = [" ".join(caption.decode("utf-8", "surrogateescape").split()) for _, caption in entries]
    usable, reasons = [], []
    for line, (source, caption, kind) in enumerate(zip(sources, captions, _kinds(sources)), 1):
        real, problem, st = _entry_problem(str(data), source, caption, kind, None, Resolver())
        if problem is None:
            usable.append((source, real, kind, st.st_size, line))
        else:
            reasons.append(f"videos.txt line {line}: {problem}")
    assert list(zip(columns.source, columns.real, columns.kind, columns.size.tolist(), columns.line)) == usable
    assert [bad.reason for bad in columns.bad] == reasons
    assert len(usable) == 8 and columns.real[1] == str(data / "v" / "a.mp4")
    assert columns.kind[-1] == "image" and columns.caption[-1] == "a still"


def test_the_sources_compared_by_code_are_exactly_the_anti_joins():
    """`_unmatched_sources` compares each row with one row of the other table that has its source, and anti-joins
    only the suspect sources: the same sources as the two full anti-joins, whatever the duplicates and nulls."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from cogtune.preprocess.staleness import _unmatched, _unmatched_sources

    rng = np.random.default_rng(0)

    def table(rows: int) -> pa.Table:
        def pick(values, nulls=0.0):
            return [None if rng.random() < nulls else values[i] for i in rng.integers(0, len(values), rows)]

        return pa.table({"source": pa.array(pick([f"v/{i}.mp4" for i in range(12)], 0.05), pa.string()),
                         "caption": pa.array(pick(["a cat", "a dog", "a cat "], 0.05), pa.string()),
                         "kind": pa.array(pick(["video", "image"]), pa.string()),
                         "source_size": pa.array(pick([10, 11]), pa.int64()),
                         "source_mtime_ns": pa.array(pick([5, 6], 0.05), pa.int64())})

    def by_anti_joins(listed: pa.Table, index: pa.Table) -> set:
        return set(_unmatched(listed, index)["source"].to_pylist() + _unmatched(index, listed)["source"].to_pylist())

    found_some = found_none = 0
    for rows, other_rows in [(0, 0), (0, 5), (5, 0), *[(int(rng.integers(1, 40)), int(rng.integers(1, 40)))
                                                          for _ in range(200)]]:
        listed, index = table(rows), table(other_rows)
        for a, b in ((listed, index), (listed, listed), (index, listed.slice(0, rows // 2))):
            differing, distinct = _unmatched_sources(a, b)
            assert set(differing.to_pylist()) == by_anti_joins(a, b)
            assert distinct == pc.count_distinct(b["source"]).as_py()
            found_some, found_none = found_some + bool(len(differing)), found_none + (not len(differing))
    assert found_some > 100 and found_none > 20  # both answers were met, many times
