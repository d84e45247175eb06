"""cogprep encode on tiny models: layouts, store contents, streaming, and incremental updates after edits."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from cogtune.shared import store as S
from cogtune.shared.demo import make_demo_dataset
from cogtune.shared.video import write_video
from prep_helpers import (
    TINY_BUCKETS,
    add_clip,
    assert_same_content,
    cogprep,
    encode,
    moved_store,
    read_lines,
    report,
    store_content,
    write_lines,
)
from safetensors.torch import load as load_safetensors


@pytest.fixture
def dataset(demo_txt, tmp_path):
    """A private copy of the demo dataset that a test may edit."""
    return shutil.copytree(demo_txt, tmp_path / "data")


@pytest.fixture
def store(demo_store, dataset, tiny_models, tmp_path) -> Path:
    """A private copy of the session's tiny-5b store of the demo dataset, for `dataset`: a test may re-encode it."""
    return moved_store(demo_store, dataset, tiny_models["5b"], tmp_path / "store")


def test_txt_layout_encodes_every_clip_into_bucketed_shards(demo_txt, demo_store):
    dataset, store = demo_txt, demo_store
    rows = S.read_index(store)
    assert sorted(r["source"] for r in rows) == sorted(read_lines(dataset / "videos.txt"))
    captions = dict(zip(read_lines(dataset / "videos.txt"), read_lines(dataset / "prompts.txt")))
    for r in rows:
        assert r["caption"] == captions[r["source"]]
        assert r["bucket"] == f"{r['frames']}x{r['height']}x{r['width']}"
        assert r["shard"].startswith(f"shards/{r['bucket']}/")
        assert r["image_offset"] == -1
    content = store_content(store)
    for r in rows:
        t = content[r["key"]]
        lat = (r["frames"] - 1) // 4 + 1
        assert t["mean"].shape == t["logvar"].shape == (16, lat, r["height"] // 8, r["width"] // 8)
        assert t["mean"].dtype == torch.bfloat16
        assert t["embedding"].shape == (226, 16)
    assert_embeddings_are_the_pipelines([r["caption"] for r in rows], [content[r["key"]]["embedding"] for r in rows])
    manifest = S.Manifest.load(store)
    assert manifest.model["variant"] == "CogVideoX-5b"
    assert sum(b["samples"] for b in manifest.buckets) == len(rows)
    assert all(b["batch_size"] == 2 for b in manifest.buckets)
    assert report(store)["encoded"] == {"videos": len(rows), "texts": len(set(captions.values()))}


def assert_embeddings_are_the_pipelines(captions: list[str], cached: list[torch.Tensor]) -> None:
    """Cached bfloat16 embeddings against ``CogVideoXPipeline._get_t5_prompt_embeds`` of the same tiny 5b (its
    eval-mode T5, float32): equal to bfloat16's rounding (relative 2^-8), while any two captions differ by far more,
    so a caption's embedding stored under another's key would not pass."""
    from cogtune.shared.zoo import build_tiny_pipeline

    pipe = build_tiny_pipeline("5b", seed=0)  # the weights `tiny_models["5b"]` wrote
    with torch.no_grad():
        expected = pipe._get_t5_prompt_embeds(captions, max_sequence_length=226, device=torch.device("cpu"),
                                              dtype=torch.float32)
    for caption, value, want in zip(captions, cached, expected):
        assert value.dtype == torch.bfloat16
        torch.testing.assert_close(value.float(), want, rtol=2**-8, atol=6e-6, msg=lambda m: f"{caption!r}: {m}")
    assert (expected[0] - expected[1]).abs().max() > 0.1


def test_every_shard_streams_with_webdataset_like_random_access(dataset, tiny_models, tmp_path):
    store = tmp_path / "store"
    encode(dataset, tiny_models["5b-i2v"], store, "--image-noise-variants", "2", "--resolution", "9x32x48")
    streamed = {}
    for shard in S.list_shards(store):
        for sample in wds.WebDataset(str(store / shard), shardshuffle=False).decode():  # gunzips .gz members
            for member in (S.LATENT, S.IMAGE, S.TEXT):
                if member in sample:
                    streamed[(sample["__key__"], member)] = load_safetensors(sample[member])
    reader = S.ShardReader(store)
    rows = S.read_index(store)
    assert rows
    for r in rows:
        for member, (shard, off, size), key in [
            (S.LATENT, (r["shard"], r["latent_offset"], r["latent_size"]), r["video_key"]),
            (S.IMAGE, (r["shard"], r["image_offset"], r["image_size"]), r["video_key"]),
            (S.TEXT, (r["text_shard"], r["text_offset"], r["text_size"]), r["text_key"]),
        ]:
            direct = reader.tensors(shard, off, size)
            for name, t in direct.items():
                assert torch.equal(t, streamed[(key, member)][name])
        image = reader.tensors(r["shard"], r["image_offset"], r["image_size"])
        assert image["noisy"].shape[0] == 2 and image["clean"].shape[1] == 1
        assert ((image["sigma"] > 0) & (image["sigma"] < 1)).all()


def test_json_layout_with_images_mixed_in(tiny_models, tmp_path):
    data = tmp_path / "json"
    samples = make_demo_dataset(data, count=3, seed=2, layout="json")
    store = tmp_path / "store"
    encode(data / "dataset.json", tiny_models["5b"], store)
    rows = S.read_index(store)
    kinds = {r["source"]: r["kind"] for r in rows}
    assert "image" in kinds.values() and "video" in kinds.values()
    assert len(rows) == len(samples)
    for r in rows:
        if r["kind"] == "image":
            assert r["frames"] == 1 and r["bucket"].startswith("1x")


def _json_with_an_image(root):
    """Two 10-frame clips and one image, all 32x48 (the I2V tiny model's native size), in a JSON list."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    entries = []
    for i in range(2):
        write_video(root / f"clip{i}.mp4", (rng.random((10, 32, 48, 3)) * 255).astype(np.uint8), fps=8)
        entries.append({"file_path": f"clip{i}.mp4", "text": f"a red circle moving up take {i}", "type": "video"})
    Image.fromarray((rng.random((32, 48, 3)) * 255).astype(np.uint8)).save(root / "still.png")
    entries.insert(1, {"file_path": "still.png", "text": "a blue square", "type": "image"})
    (root / "dataset.json").write_text(json.dumps(entries))
    return root / "dataset.json"


@pytest.mark.parametrize("slug", ["5b", "5b-i2v"])
def test_image_entries_train_text_to_video_only(slug, tiny_models, tmp_path):
    """An image-to-video sample is conditioned on its first frame: an image would be conditioned on itself and
    teach the model to copy its condition. I2V models skip image entries, named in the summary and the report
    (--strict: exit 2); T2V models train on them as 1-frame samples."""
    (tmp_path / "data").mkdir()
    data = _json_with_an_image(tmp_path / "data")
    store = tmp_path / "store"
    args = ("--resolution", "9x32x48", "--image-noise-variants", "1")
    result = encode(data, tiny_models[slug], store, *args)
    rows = S.read_index(store)
    buckets = {b["name"] for b in S.Manifest.load(store).buckets}
    if slug == "5b":
        assert sorted(r["kind"] for r in rows) == ["image", "video", "video"]
        assert buckets == {"1x32x48", "9x32x48"} and report(store)["skipped"] == []
        return
    assert [r["kind"] for r in rows] == ["video", "video"] and buckets == {"9x32x48"}
    [skipped] = report(store)["skipped"]
    assert skipped["source"] == "still.png"
    assert "still.png: image for image-to-video" in skipped["reason"] and "\n" not in skipped["reason"]
    assert "skipped 1: image for image-to-video 1" in result.output
    assert "still.png: image for image-to-video" in encode(data, tiny_models[slug], tmp_path / "strict", *args,
                                                            "--strict", expect=2).stderr
    assert not (tmp_path / "strict").exists()


def test_csv_layout_and_id_token(dataset, tiny_models, tmp_path):
    videos, prompts = read_lines(dataset / "videos.txt"), read_lines(dataset / "prompts.txt")
    (dataset / "prompts.txt").unlink()
    (dataset / "videos.txt").unlink()
    import csv

    with open(dataset / "clips.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clip", "description"])
        w.writerows(zip(videos, prompts))
    store = tmp_path / "store"
    encode(dataset, tiny_models["2b"], store, "--caption-column", "description", "--video-column", "clip",
           "--id-token", "TOK")
    rows = S.read_index(store)
    assert sorted(r["caption"] for r in rows) == sorted(f"TOK {p}" for p in prompts)


def _fresh_encode(dataset, model, tmp_path, name="fresh"):
    store = tmp_path / name
    encode(dataset, model, store)
    return store_content(store)


def test_incremental_add_two_clips(dataset, store, tiny_models, tmp_path):
    model = tiny_models["5b"]
    add_clip(dataset, "new_a.mp4", "a green square moving up over a black background", seed=1)
    add_clip(dataset, "new_b.mp4", "a blue circle moving down over a white background", seed=2)
    encode(dataset, model, store)
    assert report(store)["encoded"] == {"videos": 2, "texts": 2}
    assert report(store)["changes"]["new"] == 2
    assert_same_content(store_content(store), _fresh_encode(dataset, model, tmp_path))


def test_incremental_replace_clip_bytes_in_place(dataset, store, tiny_models, tmp_path):
    model = tiny_models["5b"]
    first = read_lines(dataset / "videos.txt")[0]
    write_video(dataset / first, (torch.rand(21, 40, 40, 3) * 255).to(torch.uint8).numpy(), fps=8)
    encode(dataset, model, store)
    assert report(store)["encoded"] == {"videos": 1, "texts": 0}
    assert report(store)["changes"]["changed"] == 1
    assert_same_content(store_content(store), _fresh_encode(dataset, model, tmp_path))


def test_incremental_caption_edit_reencodes_the_text_only(dataset, store, tiny_models, tmp_path):
    model = tiny_models["5b"]
    prompts = read_lines(dataset / "prompts.txt")
    prompts[1] = "a yellow triangle moving right over a grey background"
    write_lines(dataset / "prompts.txt", prompts)
    encode(dataset, model, store)
    assert report(store)["encoded"] == {"videos": 0, "texts": 1}
    assert_same_content(store_content(store), _fresh_encode(dataset, model, tmp_path))


def test_incremental_delete_clip_drops_it(dataset, store, tiny_models, tmp_path):
    model = tiny_models["5b"]
    videos, prompts = read_lines(dataset / "videos.txt"), read_lines(dataset / "prompts.txt")
    write_lines(dataset / "videos.txt", videos[1:])
    write_lines(dataset / "prompts.txt", prompts[1:])
    encode(dataset, model, store)
    assert report(store)["encoded"] == {"videos": 0, "texts": 0}
    assert report(store)["changes"]["removed"] == 1
    assert videos[0] not in {r["source"] for r in S.read_index(store)}
    assert_same_content(store_content(store), _fresh_encode(dataset, model, tmp_path))


def test_incremental_model_switch_reencodes_everything(dataset, store, tmp_path):
    from cogtune.shared.zoo import make_tiny_model

    n = len(S.read_index(store))
    other = make_tiny_model("5b", tmp_path / "other-model", seed=7)
    encode(dataset, other, store)
    texts = len(set(read_lines(dataset / "prompts.txt")))
    assert report(store)["encoded"] == {"videos": n, "texts": texts}
    assert_same_content(store_content(store), _fresh_encode(dataset, other, tmp_path))


def test_noop_rerun_encodes_nothing_and_status_is_current(dataset, store, tiny_models):
    model = tiny_models["5b"]
    before = store_content(store)
    encode(dataset, model, store)
    assert report(store)["encoded"] == {"videos": 0, "texts": 0}
    assert_same_content(store_content(store), before)
    result = cogprep("status", dataset, "--store", store)
    assert "store is current" in result.output
    add_clip(dataset, "late.mp4", "a red square moving left over a blue background")
    result = cogprep("status", dataset, "--store", store, expect=1)
    assert "new 1" in result.output and "late.mp4" in result.output


def test_a_noop_encode_rewrites_neither_the_index_nor_the_manifest(dataset, store, tiny_models):
    """Nothing to encode, nothing removed: index.parquet and store.json keep their bytes and mtimes (a backup or a
    sync sees nothing new). A touched source (same bytes, a new mtime) is no longer a no-op: its row records the
    mtime, so the index is rewritten with it."""
    model = tiny_models["5b"]
    committed = [store / S.INDEX, store / S.STORE_JSON]

    def state():
        return [(path.read_bytes(), path.stat().st_mtime_ns) for path in committed]

    before = state()
    encode(dataset, model, store)
    assert report(store)["encoded"] == {"videos": 0, "texts": 0}
    assert state() == before
    first = read_lines(dataset / "videos.txt")[0]
    touched = (dataset / first).stat().st_mtime_ns + 10**9
    os.utime(dataset / first, ns=(touched, touched))
    encode(dataset, model, store)
    assert report(store)["encoded"] == {"videos": 0, "texts": 0}
    assert (store / S.INDEX).stat().st_mtime_ns != before[0][1]
    assert {r["source"]: r["source_mtime_ns"] for r in S.read_index(store)}[first] == touched


def _summary(result) -> str:
    """The output of an encode without its seconds (they differ from run to run) and the columns' note."""
    return re.sub(r"\d+\.\d s| \(current by columns\)", "", result.output)


def _report_without_seconds(store: Path) -> dict:
    return {k: v for k, v in report(store).items() if k != "seconds"}


@pytest.fixture
def planned(monkeypatch):
    """The sources each `plan_encode` call of cogprep encode planned (one list per call)."""
    from cogtune.preprocess import encode as E

    calls: list[list[str]] = []
    real = E.plan_encode

    def counting(dataset, *args, **kwargs):
        calls.append([item.source for item in dataset.items])
        return real(dataset, *args, **kwargs)

    monkeypatch.setattr(E, "plan_encode", counting)
    return calls


def test_a_noop_encode_of_a_current_store_is_answered_by_columns(dataset, store, tiny_models, monkeypatch):
    """No entry planned, and the same summary, report (bad items one by one) and untouched store as the plan's
    no-op: measured against the plan path, forced by turning the columns' answer off."""
    from cogtune.preprocess import encode as E

    model = tiny_models["5b"]
    write_lines(dataset / "videos.txt", read_lines(dataset / "videos.txt") + ["videos/missing.mp4"])
    write_lines(dataset / "prompts.txt", read_lines(dataset / "prompts.txt") + ["a clip that is not there"])
    encode(dataset, model, store)  # commits the dataset with its bad entry
    committed = [(p.read_bytes(), p.stat().st_mtime_ns) for p in (store / S.INDEX, store / S.STORE_JSON)]
    with monkeypatch.context() as patch:
        patch.setattr(E, "_current_by_columns", lambda run: None)
        by_plan = _summary(encode(dataset, model, store, "--verbose"))
    expected = _report_without_seconds(store)
    assert [b["source"] for b in expected["skipped"]] == ["videos/missing.mp4"]

    def refuse(*args, **kwargs):
        raise AssertionError("a current store was planned")

    monkeypatch.setattr(E, "plan_encode", refuse)
    assert _summary(encode(dataset, model, store, "--verbose")) == by_plan
    assert _report_without_seconds(store) == expected
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in (store / S.INDEX, store / S.STORE_JSON)] == committed


def test_a_moved_dataset_is_recommitted_by_columns_as_the_plan_commits_it(dataset, store, tiny_models, tmp_path,
                                                                          planned):
    """The dataset's path is recorded, not part of any key: the index is committed again with the new path, its
    rows as they were, and nothing is planned."""
    rows = S.read_index(store)
    moved = shutil.copytree(dataset, tmp_path / "moved", copy_function=shutil.copy2)
    encode(moved, tiny_models["5b"], store)
    assert planned == []
    assert report(store)["encoded"] == {"videos": 0, "texts": 0}
    assert S.Manifest.load(store).dataset["path"] == str(moved.resolve())
    assert json.loads((store / S.STORE_JSON).read_text())["dataset"]["path"] == str(moved.resolve())
    assert S.read_index(store) == rows


@pytest.mark.slow
def test_every_torchrun_rank_takes_the_column_path_with_rank_0(dataset, store, tiny_models):
    """Rank 0 decides and broadcasts: both ranks skip the plan (a rank that planned would wait forever at the
    commit's barrier), the store is left as it was, and rank 0 alone reports."""
    committed = [(p.read_bytes(), p.stat().st_mtime_ns) for p in (store / S.INDEX, store / S.STORE_JSON)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(sys.executable).with_name("cogprep")), "encode", str(dataset), "--model", str(tiny_models["5b"]),
           "--out", str(store), "--buckets", str(TINY_BUCKETS), "--workers", "0", "--no-progress", "--verbose"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("split over 2 processes; bad items 0 (current by columns)") == 1, proc.stdout
    assert proc.stdout.count("encoded 0 clips and 0 captions") == 1, proc.stdout
    assert report(store)["encoded"] == {"videos": 0, "texts": 0}
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in (store / S.INDEX, store / S.STORE_JSON)] == committed


def _edit_caption(dataset, store, model):
    prompts = read_lines(dataset / "prompts.txt")
    prompts[0] += ", at dusk"
    write_lines(dataset / "prompts.txt", prompts)


def _damage_an_item(dataset, store, model):
    row = S.read_index(store)[0]
    S.write_damaged(store, {row["video_key"]: "crc mismatch"}, [row])


def _leave_a_pending_list(dataset, store, model):
    # the encode removes a killed run's lists before it checks: the check itself must refuse one
    from cogtune.preprocess import encode as E

    real = E._current_by_columns

    def with_a_list(run):
        (run.store / E.PENDING).mkdir()
        return real(run)

    return with_a_list


@pytest.mark.parametrize("edit, extra", [
    (_edit_caption, ()),
    (_damage_an_item, ()),
    (_leave_a_pending_list, ()),
    (None, ("--dtype", "float16")),
    (None, ("--rehash",)),
])
def test_what_the_columns_cannot_answer_the_plan_decides(dataset, store, tiny_models, planned, monkeypatch, edit,
                                                         extra):
    from cogtune.preprocess import encode as E

    model = tiny_models["5b"]
    check = edit(dataset, store, model) if edit else None
    if check is not None:
        monkeypatch.setattr(E, "_current_by_columns", check)
    encode(dataset, model, store, *extra)
    assert len(planned) == 1 and len(planned[0]) == len(read_lines(dataset / "videos.txt"))


def test_a_store_of_another_format_version_is_refused_and_left_as_it_was(dataset, store, tiny_models):
    """Its items are laid out otherwise (version 1 kept tensors uncompressed): none may be reused."""
    old = S.Manifest.load(store)
    old.version = 1
    S.write_index(store, S.read_index(store), old)
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file() and S.CACHE_DIR not in p.parts}
    result = encode(dataset, tiny_models["5b"], store, expect=2)
    assert "store format version 1, this cogtune reads 2: encode the dataset again into a new folder" in result.output
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file() and S.CACHE_DIR not in p.parts} == before


def test_latents_of_the_wrong_shape_are_refused_before_they_are_cached(tiny_models, tmp_path):
    """The tiny VAE's tiled encode (tiles of 32x48) misses by a row at 64x96, two tiles each way (9 latent rows
    for 8): the store must not take such latents, whatever their source."""
    data = tmp_path / "data"
    (data / "videos").mkdir(parents=True)
    (data / "videos.txt").write_text("")
    (data / "prompts.txt").write_text("")
    add_clip(data, "big.mp4", "a big random clip", frames=9, height=64, width=96)
    result = encode(data, tiny_models["5b"], tmp_path / "store", "--resolution", "9x64x96", "--vae-tiling",
                    expect=2)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "big.mp4: the VAE gave latents of 3x9x12" in errors[0], result.stderr
    assert errors[0].endswith("for 9x64x96 pixels, expected 3x8x12: encode without --vae-tiling")
    assert not (tmp_path / "store" / S.INDEX).exists()
    encode(data, tiny_models["5b"], tmp_path / "store", "--resolution", "9x64x96")  # untiled: the right shape
    assert S.read_index(tmp_path / "store")[0]["bucket"] == "9x64x96"


def test_clips_are_sampled_at_the_model_frame_rate_unless_told(dataset, store, tiny_models, tmp_path):
    """49 frames of a 24 fps clip cover 2 s, where CogVideoX 1.0 trained on 6.1 s at 8 fps: the default samples at
    the model's rate; --fps source keeps each clip's; the store records which, and a change re-encodes."""
    assert S.Manifest.load(store).settings["sampling"]["fps"] == 8.0
    fast = [r for r in S.read_index(store) if r["source"] in _sources_at(dataset, 24)]
    assert fast and all(r["clip_step"] == 3.0 for r in fast)  # every third frame of a 24 fps source

    encode(dataset, tiny_models["5b"], store, "--fps", "source")
    assert S.Manifest.load(store).settings["sampling"]["fps"] is None
    assert report(store)["encoded"]["videos"] == len(S.read_index(store))  # other settings: nothing reused
    assert all(r["clip_step"] == 1.0 for r in S.read_index(store))

    result = encode(dataset, tiny_models["5b"], tmp_path / "other", "--fps", "fast", expect=2)
    assert result.stderr.strip() == "error: --fps 'fast': give a frame rate, or 'source' to keep each video's own"
    assert S.Manifest.load(encode_default_1_5(dataset, tiny_models, tmp_path)).settings["sampling"]["fps"] == 16.0


def _sources_at(dataset: Path, fps: int) -> set[str]:
    from cogtune.shared.video import read_video_info

    return {line for line in read_lines(dataset / "videos.txt") if read_video_info(dataset / line)[1] == fps}


def encode_default_1_5(dataset: Path, tiny_models, tmp_path: Path) -> Path:
    store = tmp_path / "store-1.5"
    encode(dataset, tiny_models["1.5-5b"], store, "--resolution", "9x48x80")
    return store
