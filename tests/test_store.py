"""The store format: shards written atomically, random access through locations equals WebDataset streaming."""

import dataclasses
import gzip
import json
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from cogtune.shared import store as S
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from store_builder import build_random_store


def _write_items(tmp_path, n=5, max_items=2):
    w = S.ShardWriter(tmp_path, "9x32x48", prefix="r0", max_items=max_items)
    expected, locs = {}, {}
    for i in range(n):
        key = f"{i:032x}"
        t = {"mean": torch.randn(16, 3, 4, 6).bfloat16(), "logvar": torch.randn(16, 3, 4, 6).bfloat16()}
        expected[key] = t
        locs[key] = w.add(key, {S.LATENT: S.tensors_to_bytes(t), S.META: json.dumps({"i": i}).encode()})
    w.close()
    return w, expected, locs


def test_shards_roll_close_and_stream_like_random_access(tmp_path):
    w, expected, locs = _write_items(tmp_path)
    assert len(w.closed_shards) == 3  # 5 items, 2 per shard
    assert not list(tmp_path.rglob("*.tmp"))
    reader = S.ShardReader(tmp_path)
    streamed = {}
    for shard in S.list_shards(tmp_path):
        # plain webdataset, no cogtune code: its default decoder gunzips ``.gz`` members (the key stays)
        for sample in wds.WebDataset(str(tmp_path / shard), shardshuffle=False).decode():
            streamed[sample["__key__"]] = load_safetensors(sample[S.LATENT])
    assert streamed.keys() == expected.keys()
    for key, t in expected.items():
        loc = locs[key][S.LATENT]
        direct = reader.tensors(loc.shard, loc.offset, loc.size)
        for name in t:
            assert torch.equal(direct[name], t[name])
            assert torch.equal(streamed[key][name], t[name])


def test_tensor_members_are_deterministic_gzip_of_safetensors_and_smaller_than_raw_bf16():
    t = {"mean": torch.randn(16, 13, 30, 45).bfloat16(), "logvar": torch.randn(16, 13, 30, 45).bfloat16()}
    packed = S.tensors_to_bytes(t)
    assert packed == S.tensors_to_bytes({k: v.clone() for k, v in t.items()})  # no timestamp in the bytes
    raw = gzip.decompress(packed)
    assert raw == save_safetensors(t)
    assert len(packed) < 0.9 * len(raw)  # near-Gaussian bf16 values: the exponent bytes compress
    assert all(torch.equal(v, t[k]) for k, v in S.tensors_from_bytes(packed).items())


def test_scan_shard_finds_the_locations_add_returned(tmp_path):
    w, _, locs = _write_items(tmp_path)
    found = {}
    for shard in w.closed_shards:
        found.update(S.scan_shard(tmp_path, shard))
    # the same places; add also returns each member's CRC-32, which scan_shard cannot know without reading data
    assert found == {key: {m: dataclasses.replace(loc, crc=None) for m, loc in members.items()}
                     for key, members in locs.items()}
    reader = S.ShardReader(tmp_path)
    for members in locs.values():
        for loc in members.values():
            assert loc.crc == zlib.crc32(reader.read(loc.shard, loc.offset, loc.size))


def test_tensor_header_reads_names_dtypes_and_shapes_without_inflating_the_data():
    t = {"mean": torch.randn(16, 13, 30, 45).bfloat16(), "sigma": torch.rand(3)}
    packed = S.tensors_to_bytes(t)
    assert S.tensor_header(packed) == {"mean": ("bfloat16", (16, 13, 30, 45)), "sigma": ("float32", (3,))}
    # the header lies in the stream's first bytes: garbage from the middle on does not reach it...
    garbled = packed[:len(packed) // 2] + bytes(b ^ 0xFF for b in packed[len(packed) // 2:])
    assert S.tensor_header(garbled[:-4] + packed[-4:])["mean"] == ("bfloat16", (16, 13, 30, 45))
    # ... while a header that does not describe the data, or a garbled start, is refused
    with pytest.raises(S.DamagedMember, match="gzip trailer records"):
        S.tensor_header(S.tensors_to_bytes({"mean": t["mean"]})[:-4] + packed[-4:])
    with pytest.raises(S.DamagedMember, match="safetensors header"):
        S.tensor_header(packed[:12] + bytes(b ^ 0xFF for b in packed[12:40]) + packed[40:])


def test_an_index_without_crc_columns_reads_them_as_null(tmp_path):
    """A store written before the CRCs were recorded: its rows load, and their locations carry no CRC."""
    rows = build_random_store(tmp_path, {"9x32x48": (3, 2)}, i2v=True)
    path = tmp_path / S.INDEX
    table = pq.read_table(path)
    assert table.schema.field("latent_crc").type == pa.uint32()
    pq.write_table(table.drop_columns(list(S.CRC_COLUMNS)), path)
    read = S.read_index(tmp_path)
    assert [{k: v for k, v in r.items() if k not in S.CRC_COLUMNS} for r in read] == \
           [{k: v for k, v in r.items() if k not in S.CRC_COLUMNS} for r in rows]
    assert all(r[c] is None for r in read for c in S.CRC_COLUMNS)
    video, text = S.row_locations(read[0])
    assert video[S.IMAGE].crc is None and text.crc is None
    assert S.read_index_columns(tmp_path, ("key", "text_crc"))["text_crc"] == [None] * len(rows)


def test_location_columns_and_row_locations_are_inverses(tmp_path):
    _, _, locs = _write_items(tmp_path, n=2)
    video = {S.LATENT: locs[f"{0:032x}"][S.LATENT], S.IMAGE: locs[f"{1:032x}"][S.LATENT]}
    text = locs[f"{1:032x}"][S.META]
    columns = S.location_columns(video, text)
    assert set(columns) == set(S.LOCATION_COLUMNS)
    assert S.row_locations(columns) == (video, text)
    assert S.row_locations(S.location_columns({S.LATENT: video[S.LATENT]}, text)) == ({S.LATENT: video[S.LATENT]},
                                                                                       text)


def test_abort_leaves_no_shard(tmp_path):
    w = S.ShardWriter(tmp_path, "text", prefix="r0")
    w.add("a" * 32, {S.TEXT: b"x"})
    w.abort()
    assert S.list_shards(tmp_path) == [] and not list(tmp_path.rglob("*.tmp"))


def test_index_round_trip_and_manifest(tmp_path):
    row = {name: None for name in S.INDEX_SCHEMA.names}
    row.update(key="k1", source="videos/a.mp4", kind="video", bucket="9x32x48", frames=9, height=32, width=48,
               caption="a red circle", clip_start=0, clip_step=1.0, source_size=10, source_mtime_ns=1,
               source_hash="h", video_key="v", text_key="t", shard="shards/9x32x48/r0-00000.tar",
               latent_offset=512, latent_size=100, image_offset=-1, image_size=0,
               text_shard="shards/text/r0-00000.tar", text_offset=512, text_size=10, text_tokens=4)
    S.write_index(tmp_path, [row])
    assert S.read_index(tmp_path) == [row]
    m = S.Manifest(model={"variant": "CogVideoX-2b"}, settings={"dtype": "bfloat16"}, dataset={"path": "/d"})
    m.save(tmp_path)
    assert S.Manifest.load(tmp_path).model == {"variant": "CogVideoX-2b"}


def test_manifest_errors_name_the_file(tmp_path):
    import pytest
    from cogtune.shared.errors import CogtuneError

    with pytest.raises(CogtuneError, match="store.json: missing"):
        S.Manifest.load(tmp_path)
    (tmp_path / "store.json").write_text("{not json")
    with pytest.raises(CogtuneError, match="store.json: not valid JSON"):
        S.Manifest.load(tmp_path)


def test_extras_round_trip(tmp_path):
    t = {"empty_embedding": torch.randn(226, 16).bfloat16()}
    S.write_extras(tmp_path, t, {"validation_prompts": json.dumps(["a"])})
    got, meta = S.read_extras(tmp_path)
    assert torch.equal(got["empty_embedding"], t["empty_embedding"])
    assert json.loads(meta["validation_prompts"]) == ["a"]


def test_index_columns_give_the_rows_read_index_gives(tmp_path):
    rows = build_random_store(tmp_path, {"9x32x48": (5, 2), "5x16x16": (3, 2)}, i2v=True)
    columns = ("bucket", *S.SAMPLE_COLUMNS)
    compact = S.IndexColumns(tmp_path, columns)
    assert len(compact) == len(rows) == 8
    assert [compact.row(i) for i in range(8)] == S.read_index(tmp_path, columns)
    assert [compact.row(i) for i in range(8)] == [{name: row[name] for name in columns} for row in rows]
    assert compact.strings("bucket") == [row["bucket"] for row in rows]
    assert len(S.IndexColumns(tmp_path / "no-store", columns)) == 0


def test_aborting_a_shard_on_a_full_disk_still_removes_it(tmp_path, monkeypatch):
    """A full disk fails the tar's closing blocks too: the temporary shard must go all the same."""
    import errno
    import tarfile

    writer = S.ShardWriter(tmp_path, "9x32x48", "test")
    writer.add("k0", {S.META: b"{}"})
    monkeypatch.setattr(tarfile.TarFile, "close", lambda self: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    writer.abort()
    assert not list((tmp_path / S.SHARDS / "9x32x48").iterdir())
