"""Video I/O (imageio writes, decord reads) and the synthetic demo dataset."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from cogtune.preprocess.datasets import read_dataset
from cogtune.shared.demo import make_demo_dataset
from cogtune.shared.errors import CogtuneError
from cogtune.shared.video import read_frames, read_video_info, write_video
from cogtune.shared.zoo import _TOKENIZER_CORPUS
from PIL import Image

RED, GREEN, BLUE = (220, 30, 30), (30, 170, 50), (30, 60, 220)


def quadrant_clip(num_frames: int, height: int, width: int) -> np.ndarray:
    """Left half red, right half blue, with a green square whose row moves down one pixel per frame."""
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    frames[:, :, : width // 2] = RED
    frames[:, :, width // 2 :] = BLUE
    for t in range(num_frames):
        frames[t, t : t + 8, 4:12] = GREEN
    return frames


# 32x48 is the tiny models' native size, and width 48 hits a decord bug (padded rows): both paths are covered.
@pytest.mark.parametrize("height, width", [(32, 48), (40, 40), (48, 80)])
def test_decord_reads_what_imageio_writes(tmp_path, height, width):
    path = tmp_path / "clip.mp4"
    write_video(path, quadrant_clip(12, height, width), fps=12)
    assert read_video_info(path) == (12, 12.0, height, width)
    frames = read_frames(path, [0, 5, 11])
    assert frames.shape == (3, height, width, 3) and frames.dtype == np.uint8
    # Colours survive H.264 + yuv420p roughly: compare block interiors, away from chroma-blurred edges.
    assert np.abs(frames[:, 4:-4, width // 2 + 4 : -2].astype(int) - BLUE).max() < 25
    assert np.abs(frames[:, 12:-4, 14 : width // 2 - 3].astype(int) - RED).max() < 25
    assert np.abs(frames[1, 7:11, 6:10].astype(int) - GREEN).max() < 40  # frame 5: square at rows 5..12
    assert np.abs(frames[2, 13:17, 6:10].astype(int) - GREEN).max() < 40  # frame 11: rows 11..18


def test_write_is_atomic_and_replaces(tmp_path):
    path = tmp_path / "out" / "clip.mp4"
    write_video(path, quadrant_clip(9, 32, 48), fps=8)
    write_video(path, quadrant_clip(17, 32, 48), fps=8)
    assert read_video_info(path).num_frames == 17
    assert [p.name for p in path.parent.iterdir()] == ["clip.mp4"]  # no temporary left behind


def test_write_refuses_bad_frames(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "a.mp4", np.zeros((3, 33, 48, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "a.mp4", np.zeros((3, 32, 48, 3), np.float32), fps=8)
    assert list(tmp_path.iterdir()) == []


def test_image_reads_as_one_frame_video(tmp_path):
    path = tmp_path / "still.png"
    Image.new("RGBA", (20, 10), (*GREEN, 255)).save(path)
    assert read_video_info(path) == (1, 0.0, 10, 20)
    frames = read_frames(path, [0])
    assert frames.shape == (1, 10, 20, 3) and tuple(frames[0, 5, 5]) == GREEN
    with pytest.raises(CogtuneError, match="only frame 0"):
        read_frames(path, [1])


@pytest.fixture
def broken_files(tmp_path):
    good = tmp_path / "good.mp4"
    write_video(good, quadrant_clip(20, 64, 96), fps=8)
    data = good.read_bytes()
    files = {
        "missing.mp4": None,
        "empty.mp4": b"",
        "truncated.mp4": data[: len(data) // 2],
        "text.mp4": b"this is not a video at all\n" * 20,
        "broken.png": b"\x89PNG\r\n\x1a\nnot really",
    }
    for name, content in files.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
    return tmp_path


@pytest.mark.parametrize(
    "name, reason",
    [
        ("missing.mp4", "file not found"),
        ("empty.mp4", "empty file"),
        ("truncated.mp4", "not a readable video"),
        ("text.mp4", "not a readable video"),
        ("broken.png", "not a readable image"),
    ],
)
def test_unreadable_files_raise_one_line_errors_naming_the_file(broken_files, name, reason):
    path = broken_files / name
    for read in (read_video_info, lambda p: read_frames(p, [0])):
        with pytest.raises(CogtuneError) as error:
            read(path)
        message = str(error.value)
        assert message.startswith(f"{path}: {reason}") and "\n" not in message


def test_frame_index_out_of_range(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, quadrant_clip(9, 32, 32), fps=8)
    with pytest.raises(CogtuneError, match="has 9 frames, asked for frame 9"):
        read_frames(path, [0, 9])


def decoded(out, samples):
    return [read_frames(out / s.file_path, range(s.num_frames)) for s in samples]


def test_demo_dataset_is_deterministic_and_decodable(tmp_path):
    first = make_demo_dataset(tmp_path / "a", count=3, seed=7)
    again = make_demo_dataset(tmp_path / "b", count=3, seed=7)
    other = make_demo_dataset(tmp_path / "c", count=1, seed=8)
    assert first == again and first[0] != other[0]
    assert (tmp_path / "a/prompts.txt").read_text() == (tmp_path / "b/prompts.txt").read_text()
    for sample, frames, frames_again in zip(first, decoded(tmp_path / "a", first), decoded(tmp_path / "b", again)):
        info = read_video_info(tmp_path / "a" / sample.file_path)
        assert info == (sample.num_frames, sample.fps, sample.height, sample.width)
        assert frames.shape == (sample.num_frames, sample.height, sample.width, 3)
        assert np.array_equal(frames, frames_again)
        assert not np.array_equal(frames[0], frames[-1])  # the shape moves


def test_demo_txt_layout_covers_sizes_rates_and_lengths_with_known_words(tmp_path):
    samples = make_demo_dataset(tmp_path, count=8, seed=3, layout="txt")
    assert len({(s.height, s.width) for s in samples}) == 6
    assert {s.fps for s in samples} == {8, 12, 16, 24}
    # 9 to 60 frames' worth at 8 fps, as long at each clip's own rate: 8 fps sampling keeps at least 9 of them
    assert all(9 / 8 <= (s.num_frames - 1) / s.fps + 1 / 8 <= 60 / 8 + 1e-9 for s in samples)
    assert all(s.height % 2 == 0 == s.width % 2 for s in samples)
    vocabulary = set(_TOKENIZER_CORPUS)
    for sample in samples:
        assert set(sample.text.split()) <= vocabulary, sample.text
        assert re.fullmatch(r"an? \w+ (circle|square|triangle) moving [\w ]+ over an? [\w ]+ background", sample.text)
    assert (tmp_path / "videos.txt").read_text().splitlines() == [s.file_path for s in samples]
    dataset = read_dataset(tmp_path)
    assert dataset.bad == []
    assert [(i.source, i.caption, i.kind) for i in dataset.items] == [(s.file_path, s.text, s.type) for s in samples]


def test_demo_json_layout_mixes_images_in(tmp_path):
    samples = make_demo_dataset(tmp_path, count=4, seed=1, layout="json")
    manifest = json.loads((tmp_path / "dataset.json").read_text())
    kinds = [entry["type"] for entry in manifest]
    assert kinds.count("video") == 4 and kinds.count("image") == 1 and kinds[-1] == "video"
    dataset = read_dataset(tmp_path)
    assert dataset.bad == [] and len(dataset.items) == 5
    for sample, item in zip(samples, dataset.items):
        info = read_video_info(item.path)
        assert (item.width, item.height) == (info.width, info.height) == (sample.width, sample.height)
        assert item.kind == sample.type


def test_demo_script(tmp_path, capsys):
    import runpy
    import sys

    argv = sys.argv
    sys.argv = ["make_demo_dataset.py", "--out", str(tmp_path), "--count", "2", "--layout", "json"]
    try:
        runpy.run_path(str(Path(__file__).parents[1] / "scripts/make_demo_dataset.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert "wrote 2 videos and 1 images" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "dataset.json").read_text())) == 3
