"""cogprep gc, inspect and extract-frames: space reclaimed without changing what the store means, kills at any
step leave a valid store, previews decoded from the cached latents, first frames for I2V datasets."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import webdataset as wds
from cogtune.preprocess import compute as C
from cogtune.preprocess import store_gc as G
from cogtune.preprocess import store_inspect as I
from cogtune.preprocess.datasets import read_dataset
from cogtune.preprocess.frames import ClipWindow, resize_to_bucket
from cogtune.shared import store as S
from cogtune.shared.errors import CogtuneError
from cogtune.shared.models import open_model
from cogtune.shared.video import read_frames, write_video
from PIL import Image
from prep_helpers import (
    assert_same_content,
    cogprep,
    read_lines,
    report,
    store_content,
    write_lines,
)
from store_builder import build_random_store


def encode_9_frames(dataset, model, store):
    """Encode with 9-frame buckets only (half the VAE work, so half the test time, of the tiny buckets' 17
    frames), in float32 so that the preview can be checked to the last bit."""
    buckets = store.parent / "buckets.yaml"
    buckets.write_text("resolutions: [[32, 48], [48, 32], [32, 32]]\nframes: [9]\nbatch_size: 2\n")
    cogprep("encode", dataset, "--model", model, "--out", store, "--buckets", buckets, "--dtype", "float32")


@pytest.fixture(scope="module")
def edited(demo_txt, tiny_models, tmp_path_factory):
    """(dataset, store) after an encode and then a caption edit, a clip replaced and a clip deleted, re-encoded:
    the store holds dead items of all three kinds."""
    root = tmp_path_factory.mktemp("edited")
    dataset, store = shutil.copytree(demo_txt, root / "data"), root / "store"
    encode_9_frames(dataset, tiny_models["5b"], store)
    videos, prompts = read_lines(dataset / "videos.txt"), read_lines(dataset / "prompts.txt")
    prompts[1] = "a yellow triangle moving right over a grey background"
    write_video(dataset / videos[2], (np.random.default_rng(5).random((21, 40, 40, 3)) * 255).astype(np.uint8), 8)
    write_lines(dataset / "videos.txt", videos[1:])
    write_lines(dataset / "prompts.txt", prompts[1:])
    encode_9_frames(dataset, tiny_models["5b"], store)
    assert report(store)["encoded"] == {"videos": 1, "texts": 1}
    return dataset, store


def _files(store):
    return {p.relative_to(store).as_posix(): p.stat().st_mtime_ns for p in store.rglob("*")}


def _streamed_keys(store) -> list[str]:
    """Every item key of every shard, read with plain WebDataset streaming."""
    keys = []
    for shard in S.list_shards(store):
        keys += [sample["__key__"] for sample in wds.WebDataset(str(store / shard), shardshuffle=False)]
    return keys


def _live_keys(store) -> set[str]:
    rows = S.read_index(store)
    return {r["video_key"] for r in rows} | {r["text_key"] for r in rows}


def test_gc_after_edits_reclaims_dead_items_and_keeps_content(edited, tiny_models, tmp_path):
    dataset, original = edited
    store = shutil.copytree(original, tmp_path / "store")
    content = store_content(store)
    (store / S.SHARDS / "text" / ".killed-00000.tar.tmp").write_bytes(b"half a shard")
    (store / ".pending").mkdir()
    (store / ".pending" / "killed.json").write_text("{}")
    plan = G.plan_gc(store)
    assert plan.keep and plan.rewrite and len(plan.temp_files) == 2
    kept = {u.shard: (store / u.shard).stat().st_mtime_ns for u in plan.keep}

    files = _files(store)
    dry = cogprep("gc", store, "--dry-run")
    assert "would rewrite" in dry.output and "would reclaim" in dry.output
    assert _files(store) == files

    before = S.disk_bytes(store)
    out = cogprep("gc", store).output
    assert f"bytes before {before}" in out
    assert S.disk_bytes(store) < before
    assert_same_content(store_content(store), content)
    assert {s: (store / s).stat().st_mtime_ns for s in kept} == kept  # all-live shards untouched
    for use in plan.rewrite:
        assert not (store / use.shard).exists()
    assert not list(store.rglob("*.tmp")) and not (store / ".pending").exists()
    streamed = _streamed_keys(store)
    assert sorted(streamed) == sorted(_live_keys(store))  # every live item once, nothing dead

    assert "reclaimed 0 (0 B)" in cogprep("gc", store).output
    _assert_verified_by_crc_alone(store)  # the relocated members carry the CRCs recorded when they were written
    encode_9_frames(dataset, tiny_models["5b"], store)  # the relocated items are reused as they are
    assert report(store)["encoded"] == {"videos": 0, "texts": 0}
    assert_same_content(store_content(store), content)
    _assert_verified_by_crc_alone(store)


def _assert_verified_by_crc_alone(store):
    """Every member of `store` has a CRC in the index, and verify finds every one of them whole by it."""
    assert all(r[c] is not None for r in S.read_index(store) for c in ("latent_crc", "text_crc"))
    out = cogprep("verify", store, "--no-progress").output
    assert "0 damaged samples" in out and "inflated" not in out


def test_damage_before_gc_is_still_found_after_it(edited, tmp_path):
    """gc copies a live item's bytes as they are, damage included, and its recorded CRC with them: the copy
    cannot vouch for the damage."""
    store = shutil.copytree(edited[1], tmp_path / "store")
    moving = {u.shard for u in G.plan_gc(store).rewrite}
    row = next(r for r in S.read_index(store) if r["shard"] in moving)
    with open(store / row["shard"], "r+b") as f:
        f.seek(row["latent_offset"] + row["latent_size"] - 50)
        flipped = bytes(b ^ 0xFF for b in f.read(4))
        f.seek(row["latent_offset"] + row["latent_size"] - 50)
        f.write(flipped)
    cogprep("gc", store)
    moved = next(r for r in S.read_index(store) if r["key"] == row["key"])
    assert moved["shard"] != row["shard"] and moved["latent_crc"] == row["latent_crc"]
    out = cogprep("verify", store, "--no-progress", expect=1).output
    assert f"{store / moved['shard']} at byte {moved['latent_offset']}: stored bytes changed since they were " \
           f"written (CRC-32 " in out


@pytest.fixture
def i2v_store(tmp_path):
    """A random I2V store (video items with image members, 2 items a shard) where the index no longer points at
    samples 0, 1 (a whole shard of bucket 9x16x16), 4 and 6."""
    store = tmp_path / "random"
    rows = build_random_store(store, {"9x16x16": (4, 1), "17x16x24": (4, 1)}, i2v=True)
    S.write_index(store, [r for r in rows if r["caption"] not in {f"random sample {i}" for i in (0, 1, 4, 6)}])
    return store


def test_gc_relocates_image_members_and_deletes_dead_shards(i2v_store):
    content = store_content(i2v_store)
    plan = G.plan_gc(i2v_store)
    assert plan.delete and plan.rewrite
    cogprep("gc", i2v_store)
    assert_same_content(store_content(i2v_store), content)
    assert all(r["image_offset"] >= 0 for r in S.read_index(i2v_store))
    assert sorted(_streamed_keys(i2v_store)) == sorted(_live_keys(i2v_store))
    for shard in plan.delete:
        assert not (i2v_store / shard).exists()


def test_gc_killed_before_the_index_commit_leaves_the_old_store(i2v_store, monkeypatch):
    content, shards = store_content(i2v_store), set(S.list_shards(i2v_store))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(S, "write_index", killed)
        with pytest.raises(KeyboardInterrupt):
            G.run_gc(i2v_store, G.plan_gc(i2v_store))
    assert set(S.list_shards(i2v_store)) > shards  # the copies are orphans of the intact old index
    assert_same_content(store_content(i2v_store), content)
    cogprep("gc", i2v_store)
    assert_same_content(store_content(i2v_store), content)
    assert sorted(_streamed_keys(i2v_store)) == sorted(_live_keys(i2v_store))


def test_gc_killed_after_the_index_commit_leaves_the_new_store(i2v_store, monkeypatch):
    content = store_content(i2v_store)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(G, "_delete_after_commit", killed)
        with pytest.raises(KeyboardInterrupt):
            G.run_gc(i2v_store, G.plan_gc(i2v_store))
    assert_same_content(store_content(i2v_store), content)
    leftover = G.plan_gc(i2v_store)
    assert leftover.delete and not leftover.rewrite  # the old shards are now whole orphans
    cogprep("gc", i2v_store)
    assert_same_content(store_content(i2v_store), content)
    assert sorted(_streamed_keys(i2v_store)) == sorted(_live_keys(i2v_store))


def test_gc_refuses_a_store_whose_index_points_at_a_missing_shard(i2v_store):
    (i2v_store / S.read_index(i2v_store)[0]["shard"]).unlink()
    files = _files(i2v_store)
    result = cogprep("gc", i2v_store, expect=2)
    assert "store damaged" in result.output and len(result.output.strip().splitlines()) == 1
    assert _files(i2v_store) == files


@pytest.mark.parametrize("i2v", [False, True])
def test_referenced_members_are_the_row_locations_of_every_row(tmp_path, i2v):
    store = tmp_path / "random"
    rows = build_random_store(store, {"9x16x16": (3, 1), "17x16x24": (2, 1)}, i2v=i2v)
    rows[1] = {**rows[1], **{c: rows[0][c] for c in ("text_shard", "text_offset", "text_size")}}  # a shared caption
    S.write_index(store, rows)
    expected: dict[str, list[tuple[int, int]]] = {}
    for row in rows:
        video, text = S.row_locations(row)
        for loc in (*video.values(), text):
            expected.setdefault(loc.shard, []).append((loc.offset, loc.size))
    referenced = S.referenced_members(store)
    assert {shard: sorted(zip(offsets.tolist(), sizes.tolist())) for shard, (offsets, sizes) in referenced.items()} \
        == {shard: sorted(pairs) for shard, pairs in expected.items()}


def test_gc_refuses_an_index_pointing_between_members_and_counts_each_once(i2v_store):
    rows = S.read_index(i2v_store)
    rows[0]["latent_offset"] += 1
    rows[1] = {**rows[1], **{c: rows[0][c] for c in ("shard", "latent_offset", "latent_size")}}
    S.write_index(i2v_store, rows)
    result = cogprep("gc", i2v_store, "--dry-run", expect=2)
    assert (f"points at {rows[0]['shard']} byte {rows[0]['latent_offset']}, where no item is: store damaged "
            "(1 such members)") in result.output


def test_gc_refuses_an_index_changed_since_it_planned(i2v_store):
    plan = G.plan_gc(i2v_store)
    S.write_index(i2v_store, S.read_index(i2v_store)[1:])
    files = _files(i2v_store)
    with pytest.raises(CogtuneError, match="changed since gc planned"):
        G.run_gc(i2v_store, plan)
    assert _files(i2v_store) == files


def test_inspect_prints_buckets_model_settings_and_report(edited, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    _, store = edited
    out = cogprep("inspect", store).output
    manifest = S.Manifest.load(store)
    for bucket in manifest.buckets:
        assert bucket["name"] in out
    for expected in ("CogVideoX-5b", manifest.model["fingerprints"]["vae"], "video samples", "video shards",
                     "reclaimable by cogprep gc", "setting dtype", "float32", str(manifest.dataset["path"])):
        assert expected in out
    assert f"{len(report(store)['skipped'])} (details in" in out


def test_inspect_preview_decodes_the_cached_latents(edited, tiny_models, tmp_path):
    dataset, store = edited
    out = tmp_path / "preview.png"
    cogprep("inspect", store, "--preview", out, "--max-samples", "3")
    sheet = np.asarray(Image.open(out).convert("RGB"))
    columns, rows = I.sheet_grid(3)
    assert (columns, rows) == (2, 2)
    assert sheet.shape == (rows * (I.TILE + I.LABEL_HEIGHT), columns * I.TILE, 3)
    cells = [sheet[r * (I.TILE + I.LABEL_HEIGHT):(r + 1) * (I.TILE + I.LABEL_HEIGHT), c * I.TILE:(c + 1) * I.TILE]
             for r in range(rows) for c in range(columns)]
    assert [bool((cell != I.BACKGROUND).any()) for cell in cells] == [True, True, True, False]

    # The tiny VAE is random: check the decode against the pipeline's own round trip of the same clip.
    vae = C.preview_vae(open_model(tiny_models["5b"], ("vae",)))
    shown = I.preview_rows(S.read_index(store), 2)
    decoded = C.decode_first_frames(store, shown, vae)
    for row, frame in zip(shown, decoded):
        window = ClipWindow(row["clip_start"], row["clip_step"], row["frames"])
        pixels = resize_to_bucket(read_frames(dataset / row["source"], window.indices), row["height"], row["width"])
        x = torch.from_numpy(pixels).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
        with torch.no_grad():
            expected = vae.decode(vae.encode(x).latent_dist.mean).sample[0, :, 0]
        expected = ((expected / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert frame.shape == (row["height"], row["width"], 3)
        assert np.abs(frame.astype(int) - expected.astype(int)).max() <= 1


def test_first_frame_of_the_first_latent_batch_is_the_first_frame_of_a_full_decode(tiny_models):
    # 9-frame clips decode in one latent batch anyway; 49-frame ones (13 latent frames) take the shortcut.
    vae = C.preview_vae(open_model(tiny_models["5b"], ("vae",)))
    mean = torch.randn(16, 5, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = vae.decode(mean[None]).sample[0, :, 0]
    full = ((full / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(C.decode_first_frame(vae, mean), full)


def test_extract_frames_writes_first_frames_that_read_dataset_pairs(demo_txt, tmp_path):
    dataset = shutil.copytree(demo_txt, tmp_path / "data")
    videos, prompts = read_lines(dataset / "videos.txt"), read_lines(dataset / "prompts.txt")
    (dataset / "videos" / "broken.mp4").write_bytes(b"not a video")
    (dataset / "videos" / "again").mkdir()
    shutil.copy(dataset / videos[0], dataset / "videos" / "again" / "clip_000.mp4")  # same stem, other folder
    videos += ["videos/broken.mp4", "videos/again/clip_000.mp4"]
    write_lines(dataset / "videos.txt", videos)
    write_lines(dataset / "prompts.txt", prompts + ["a red circle moving up", "a blue square moving down"])

    out = cogprep("extract-frames", dataset).output
    assert "broken.mp4" in out and "wrote 6 first frames" in out
    images = (dataset / "images.txt").read_text().split("\n")[:-1]
    assert len(images) == len(videos) and images[5] == ""
    assert images[6] == "images/clip_000-7.png"
    for video, image in zip(videos, images):
        if image:
            first = read_frames(dataset / video, [0])[0]
            assert np.array_equal(np.asarray(Image.open(dataset / image).convert("RGB")), first)

    data = read_dataset(dataset)
    assert {item.source: item.image for item in data.items} == {
        v: (dataset / i).resolve() for v, i in zip(videos, images) if i}
    assert [b.source for b in data.bad] == ["videos/broken.mp4"]

    assert "--overwrite" in cogprep("extract-frames", dataset, expect=2).output
    quiet = cogprep("extract-frames", dataset, "--overwrite", "--quiet")  # a video without an image is a warning
    assert quiet.stdout == "" and quiet.stderr.startswith("cogprep: warning: no image: videos.txt line 6: ")
