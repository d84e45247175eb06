"""cogprep verify: damage injected into a store (flipped bytes, a truncated or deleted shard) is found, named by
source and caption, recorded; cogprep status then says stale, and cogprep encode re-encodes exactly the damaged
items, giving back the store an undamaged encode makes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cogtune.shared import store as S
from prep_helpers import assert_same_content, cogprep, encode, store_content


@pytest.fixture(scope="module")
def clean_store(demo_txt, tiny_models, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("verify") / "store"
    encode(demo_txt, tiny_models["5b"], store)
    return store


@pytest.fixture
def store(clean_store, tmp_path) -> Path:
    return shutil.copytree(clean_store, tmp_path / "store")


def flip_bytes(store: Path, shard: str, offset: int) -> None:
    with open(store / shard, "r+b") as f:
        f.seek(offset)
        data = f.read(8)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def verify(store: Path, expect: int):
    return cogprep("verify", store, "--no-progress", expect=expect)


def reencode(demo_txt: Path, tiny_model: Path, store: Path) -> dict:
    encode(demo_txt, tiny_model, store)
    return json.loads((store / S.REPORT).read_text())


def test_a_clean_store_verifies_and_records_nothing(store):
    result = verify(store, 0)
    rows = S.read_index(store)
    members = len({(r["shard"], r["latent_offset"]) for r in rows} | {(r["text_shard"], r["text_offset"]) for r in rows})
    assert result.stdout.strip().endswith(f"checked {members} members ({result.stdout.split('(')[1].split(')')[0]}); "
                                          "0 damaged samples")
    assert not (store / S.DAMAGED).exists()


@pytest.mark.parametrize("member", ["latent", "text"])
def test_flipped_bytes_are_found_named_and_re_encoded_exactly(store, clean_store, demo_txt, tiny_models, member):
    rows = S.read_index(store)
    row = rows[1]
    flip_bytes(store, row[f"{'text_' if member == 'text' else ''}shard"], row[f"{member}_offset"] + row[f"{member}_size"] // 2)
    result = verify(store, 1)
    sharing = [r for r in rows if r[f"{'text' if member == 'text' else 'video'}_key"] ==
               row[f"{'text' if member == 'text' else 'video'}_key"]]
    damaged = [line for line in result.stdout.splitlines() if line.startswith("damaged: ")]
    assert len(damaged) == len(sharing)
    assert any(line.startswith(f"damaged: {row['source']} ({row['bucket']}, caption {row['caption']!r}): ")
               for line in damaged), damaged
    assert f"{len(sharing)} damaged samples: recorded in damaged.json" in result.stdout

    status = cogprep("status", demo_txt, "--store", store, expect=1)
    assert "to encode: " + ("0 clips, 1 captions" if member == "text" else "1 clips, 0 captions") in status.stdout
    assert f"changed: {row['source']}" in status.stdout

    report = reencode(demo_txt, tiny_models["5b"], store)
    assert report["encoded"] == ({"videos": 0, "texts": 1} if member == "text" else {"videos": 1, "texts": 0})
    assert not (store / S.DAMAGED).exists()
    verify(store, 0)
    assert_same_content(store_content(store), store_content(clean_store))


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_short_or_missing_shard_is_found_by_its_size_and_its_items_re_encoded(store, clean_store, demo_txt,
                                                                              tiny_models, damage, monkeypatch):
    rows = S.read_index(store)
    shard = rows[0]["shard"]
    path = store / shard
    inside = [r for r in rows if r["shard"] == shard]
    if damage == "deleted":
        path.unlink()
    else:
        cut = min(r["latent_offset"] for r in inside) + 1
        path.write_bytes(path.read_bytes()[:cut])
    from cogtune.shared import store as store_module

    decoded = []
    real = store_module.tensors_from_bytes
    monkeypatch.setattr(store_module, "tensors_from_bytes", lambda data: decoded.append(len(data)) or real(data))
    result = verify(store, 1)
    monkeypatch.undo()
    problem = "missing" if damage == "deleted" else "truncated at byte"
    assert all(f"{path}: {problem}" in line for line in result.stdout.splitlines() if line.startswith("damaged: "))
    assert f"{len(inside)} damaged samples" in result.stdout
    elsewhere = {(r["shard"], r["latent_offset"]) for r in rows if r["shard"] != shard}
    assert len(decoded) == len(elsewhere | {(r["text_shard"], r["text_offset"]) for r in rows}), \
        "a member of the damaged shard was read: its size alone condemns it"

    report = reencode(demo_txt, tiny_models["5b"], store)
    assert report["encoded"] == {"videos": len({r["video_key"] for r in inside}), "texts": 0}
    verify(store, 0)
    assert_same_content(store_content(store), store_content(clean_store))


def test_chunks_split_shards_in_file_order_within_the_byte_limit():
    from cogtune.preprocess.verify import Member, _chunks

    members = [Member(shard, offset, size, f"{shard}{offset}", "text", ())
               for shard, offset, size in [("b", 0, 40), ("a", 100, 30), ("a", 0, 60), ("a", 60, 30), ("b", 40, 80)]]
    chunks = [[(m.shard, m.offset) for m in chunk] for chunk in _chunks(members, 90)]
    # a's 60 + 30 fill one chunk, its third member starts the next; b's 40 + 80 overflow: a member alone is kept
    assert chunks == [[("a", 0), ("a", 60)], [("a", 100)], [("b", 0)], [("b", 40)]]


def test_damage_is_found_whatever_the_chunks_and_threads(store, monkeypatch):
    from cogtune.preprocess import verify as V

    rows = S.read_index(store)
    damaged = {rows[0]["video_key"], rows[-1]["text_key"]}
    flip_bytes(store, rows[0]["shard"], rows[0]["latent_offset"] + rows[0]["latent_size"] // 2)
    flip_bytes(store, rows[-1]["text_shard"], rows[-1]["text_offset"] + rows[-1]["text_size"] // 2)
    monkeypatch.setattr(V, "CHUNK_BYTES", 1)  # one member a chunk: many tasks over each shard, on 3 threads
    for workers in (1, 3):
        result = V.verify_store(store, workers=workers, progress=False)
        assert set(result.damaged_items) == damaged, workers
        assert result.bytes_read == sum(m.size for m in V._members(rows)[0])
