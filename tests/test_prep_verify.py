"""cogprep verify: damage injected into a store (flipped bytes, a truncated or deleted shard) is found, named by
source and caption, recorded; cogprep status then says stale, and cogprep encode re-encodes exactly the damaged
items, giving back the store an undamaged encode makes."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
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


def verify(store: Path, expect: int, *options: str):
    return cogprep("verify", store, "--no-progress", *options, expect=expect)


def count_calls(monkeypatch, name: str) -> list[int]:
    """The sizes of the bytes each call of the store's function `name` gets, from now on."""
    calls, real = [], getattr(S, name)
    monkeypatch.setattr(S, name, lambda data, *rest: calls.append(len(data)) or real(data, *rest))
    return calls


def members_of(store: Path) -> int:
    rows = S.read_index(store)
    return len({(r["shard"], r["latent_offset"]) for r in rows} | {(r["text_shard"], r["text_offset"]) for r in rows})


def reencode(demo_txt: Path, tiny_model: Path, store: Path) -> dict:
    encode(demo_txt, tiny_model, store)
    return json.loads((store / S.REPORT).read_text())


def test_a_clean_store_verifies_and_records_nothing(store, monkeypatch):
    inflated = count_calls(monkeypatch, "tensors_from_bytes")
    result = verify(store, 0)
    members = members_of(store)
    size = result.stdout.split('(')[1].split(')')[0]
    assert result.stdout.strip().endswith(f"checked {members} members ({size}); 0 damaged samples")
    assert "inflated" not in size and not inflated  # every member's CRC is recorded: none inflated
    assert not (store / S.DAMAGED).exists()
    assert verify(store, 0, "--deep").stdout.strip().endswith(
        f"checked {members} members ({size}, {members} inflated in full); 0 damaged samples")
    assert len(inflated) == members


def test_a_flip_past_the_header_is_caught_by_the_crc_alone_without_inflating(store, monkeypatch):
    from cogtune.preprocess import verify as V

    row = S.read_index(store)[0]
    at = row["latent_offset"] + row["latent_size"] - 100  # deep in the deflate stream, far past the header
    flip_bytes(store, row["shard"], at)
    with open(store / row["shard"], "rb") as f:
        f.seek(row["latent_offset"])
        damaged = f.read(row["latent_size"])
    assert S.tensor_header(damaged)[S.MEAN][0] == "bfloat16"  # the header alone cannot tell
    inflated, headers = count_calls(monkeypatch, "tensors_from_bytes"), count_calls(monkeypatch, "_inflate_first")
    result = V.verify_store(store, workers=2, progress=False)
    problem = result.damaged_items[row["video_key"]]
    crc = zlib.crc32(damaged)
    assert problem == (f"{store / row['shard']} at byte {row['latent_offset']}: stored bytes changed since they "
                       f"were written (CRC-32 {crc:08x}, recorded {row['latent_crc']:08x})")
    assert list(result.damaged_items) == [row["video_key"]]
    assert not inflated and len(headers) == 2 * (members_of(store) - 1)  # 8 bytes, then the header, of the others

    deep = V.verify_store(store, workers=2, progress=False, deep=True)
    assert deep.damaged_items == result.damaged_items  # the CRC, compared first, names it there too
    assert len(inflated) == members_of(store) - 1


def test_a_store_without_recorded_crcs_is_verified_by_inflating(store, monkeypatch):
    """A store written before the CRCs were recorded: its index has no CRC columns, and verify falls back to
    inflating every member, which still finds a flip."""
    table = pq.read_table(store / S.INDEX)
    pq.write_table(table.drop_columns(list(S.CRC_COLUMNS)), store / S.INDEX)  # the manifest metadata is kept
    assert not set(S.CRC_COLUMNS) & set(pq.read_schema(store / S.INDEX).names)
    inflated = count_calls(monkeypatch, "tensors_from_bytes")
    members = members_of(store)
    assert f"{members} inflated in full); 0 damaged samples" in verify(store, 0).stdout
    assert len(inflated) == members
    row = S.read_index(store)[1]
    flip_bytes(store, row["shard"], row["latent_offset"] + row["latent_size"] // 2)
    result = verify(store, 1)
    assert f"{store / row['shard']} at byte {row['latent_offset']}: " in result.stdout
    assert "CRC-32" not in result.stdout  # found by inflating: gzip's own CRC or a garbled stream


@pytest.mark.parametrize("change", ["bucket", "text_length", "dtype"])
def test_tensors_that_disagree_with_the_index_are_caught_from_the_header(store, monkeypatch, change):
    """The CRCs match (the bytes are those written), but the index or store.json says otherwise: the safetensors
    header alone, on the fast path, shows the names, shapes and dtypes disagree."""
    row = S.read_index(store)[0]
    if change == "bucket":
        table = pq.read_table(store / S.INDEX)
        frames = pa.array([f + 4 if key == row["key"] else f for key, f in
                           zip(table["key"].to_pylist(), table["frames"].to_pylist())], pa.int32())
        pq.write_table(table.set_column(table.schema.get_field_index("frames"), "frames", frames), store / S.INDEX)
    else:
        manifest = S.Manifest.load(store)
        manifest.settings[change] = {"text_length": 7, "dtype": "float16"}[change]
        manifest.save(store)
    inflated = count_calls(monkeypatch, "tensors_from_bytes")
    result = verify(store, 1)
    assert not inflated
    problems = {line.split(": ", 2)[-1] for line in result.stdout.splitlines() if line.startswith("damaged: ")}
    grid = f"{(row['frames'] + 4 - 1) // 4 + 1}, {row['height'] // 8}, {row['width'] // 8}"
    expect = {"bucket": "latent of shape (", "text_length": "embedding of shape (", "dtype": ": not float16"}[change]
    assert problems and all(expect in p for p in problems), problems
    if change == "bucket":
        assert f"expected [C, {grid}]" in result.stdout and len(problems) == 1


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
    decoded = count_calls(monkeypatch, "stored_crc")  # once for every member read
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
