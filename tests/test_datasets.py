"""Dataset readers: txt, CSV and JSON / JSONL layouts, detection, and per-item problems as bad items."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cogtune.preprocess.datasets import detect_layout, read_dataset
from cogtune.shared.errors import CogtuneError


def touch(root: Path, *names: str) -> None:
    """Stand-in media files: readers check existence only, decoding comes later."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def summary(dataset):
    return [(i.source, i.caption, i.kind, i.line) for i in dataset.items]


def test_txt_layout_with_crlf_bom_and_trailing_blank_lines(tmp_path):
    touch(tmp_path, "clips/a.mp4", "clips/b.mp4", "c.png")
    (tmp_path / "prompts.txt").write_bytes(b"\xef\xbb\xbfa red circle\r\n  a blue square  \r\na green triangle\r\n\r\n\r\n")
    (tmp_path / "videos.txt").write_bytes(b"\xef\xbb\xbfclips/a.mp4\r\nclips/b.mp4\r\nc.png\r\n\n")
    dataset = read_dataset(tmp_path)
    assert dataset.layout == "txt" and dataset.bad == []
    assert summary(dataset) == [
        ("clips/a.mp4", "a red circle", "video", 1),
        ("clips/b.mp4", "a blue square", "video", 2),
        ("c.png", "a green triangle", "image", 3),
    ]
    assert dataset.items[0].path == (tmp_path / "clips/a.mp4").resolve()
    assert dataset.items[0].image is None


@pytest.mark.parametrize("prompts, videos, images, longer, shorter", [
    ("one\ntwo\nthree\nfour\n", "a.mp4\nb.mp4\n", None, ("prompts.txt", 4), ("videos.txt", 2)),
    # a caption missing in the middle: every later clip would get the next clip's caption
    ("one\nthree\n", "a.mp4\nb.mp4\nc.mp4\n", None, ("videos.txt", 3), ("prompts.txt", 2)),
    ("one\ntwo\nthree\n", "a.mp4\nb.mp4\nc.mp4\n", "a.png\nb.png\n", ("prompts.txt", 3), ("images.txt", 2)),
])
def test_txt_layout_refuses_lists_of_different_lengths(tmp_path, prompts, videos, images, longer, shorter):
    touch(tmp_path, "a.mp4", "b.mp4", "c.mp4", "a.png", "b.png")
    (tmp_path / "prompts.txt").write_text(prompts)
    (tmp_path / "videos.txt").write_text(videos)
    if images is not None:
        (tmp_path / "images.txt").write_text(images)
    with pytest.raises(CogtuneError) as e:
        read_dataset(tmp_path)
    message = str(e.value)
    assert "\n" not in message
    assert f"{tmp_path / longer[0]} has {longer[1]} lines but {tmp_path / shorter[0]} has {shorter[1]}" in message


def test_txt_layout_trailing_blank_lines_count_only_where_another_list_reaches(tmp_path):
    """An editor's final blank lines are no entries; an empty last images.txt line (extract-frames writes one for
    an unreadable last video) is that video's entry."""
    touch(tmp_path, "a.mp4", "b.mp4", "a.png")
    (tmp_path / "prompts.txt").write_text("one\ntwo\n\n\n")
    (tmp_path / "videos.txt").write_text("a.mp4\nb.mp4\n")
    (tmp_path / "images.txt").write_text("a.png\n\n")
    dataset = read_dataset(tmp_path)
    assert [i.source for i in dataset.items] == ["a.mp4"]
    assert [b.reason for b in dataset.bad] == ["images.txt line 2: empty image path"]


def test_txt_layout_per_item_problems_are_bad_items(tmp_path):
    touch(tmp_path, "a.mp4", "b.mp4", "c.mp4", "d.mp4")
    (tmp_path / "sub").mkdir()
    (tmp_path / "prompts.txt").write_bytes(b"fine\n   \nbad \xff\xfe bytes\nmissing\nfolder\nno path\nfine too\n")
    (tmp_path / "videos.txt").write_text("a.mp4\nb.mp4\nc.mp4\ngone.mp4\nsub\n\nd.mp4\n")
    dataset = read_dataset(tmp_path)
    assert [i.source for i in dataset.items] == ["a.mp4", "d.mp4"]
    assert [b.reason for b in dataset.bad] == [
        "videos.txt line 2: empty caption",
        "videos.txt line 3: caption is not valid UTF-8",
        "videos.txt line 4: gone.mp4 not found",
        "videos.txt line 5: sub is not a file",
        "videos.txt line 6: empty path",
    ]
    assert dataset.bad[-1].source == "videos.txt line 6"


def test_txt_layout_with_images_for_i2v(tmp_path):
    touch(tmp_path, "a.mp4", "b.mp4", "c.mp4", "images/a.png")
    (tmp_path / "prompts.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "videos.txt").write_text("a.mp4\nb.mp4\nc.mp4\n")
    (tmp_path / "images.txt").write_text("images/a.png\nimages/missing.png\n\n")
    dataset = read_dataset(tmp_path)
    assert [(i.source, i.image) for i in dataset.items] == [("a.mp4", (tmp_path / "images/a.png").resolve())]
    assert [b.reason for b in dataset.bad] == [
        "images.txt line 2: images/missing.png not found",
        "images.txt line 3: empty image path",
    ]


def test_txt_layout_custom_file_names_and_id_token(tmp_path):
    touch(tmp_path, "a.mp4")
    (tmp_path / "captions.txt").write_text("a red circle\n")
    (tmp_path / "clips.txt").write_text("a.mp4\n")
    dataset = read_dataset(tmp_path, "txt", caption_column="captions.txt", video_column="clips.txt", id_token="SKS")
    assert summary(dataset) == [("a.mp4", "SKS a red circle", "video", 1)]


def test_csv_guesses_caption_and_video_columns(tmp_path):
    touch(tmp_path, "v/a.mp4", "v/b.jpg")
    (tmp_path / "data.csv").write_bytes(
        b'\xef\xbb\xbfid,video_file,Caption\r\n1,v/a.mp4,"a red circle, moving"\r\n\r\n2,v/b.jpg,"two\r\nlines"\r\n'
        b"3,v/a.mp4\r\n"
    )
    dataset = read_dataset(tmp_path)
    assert dataset.layout == "csv"
    assert summary(dataset) == [("v/a.mp4", "a red circle, moving", "video", 2), ("v/b.jpg", "two lines", "image", 4)]
    assert [(b.source, b.reason) for b in dataset.bad] == [
        ("v/a.mp4", "data.csv line 6: row has 2 fields, the header has 3")
    ]


def test_csv_named_columns(tmp_path):
    touch(tmp_path, "a.mp4")
    (tmp_path / "data.csv").write_text("clip,description,notes\na.mp4,a blue square,x\n")
    dataset = read_dataset(tmp_path / "data.csv", caption_column="description", video_column="clip")
    assert summary(dataset) == [("a.mp4", "a blue square", "video", 2)]


def test_csv_without_recognisable_columns(tmp_path):
    (tmp_path / "data.csv").write_text("clip,description\na.mp4,a blue square\n")
    with pytest.raises(CogtuneError, match=r"data.csv: cannot tell which column holds the captions \(columns: clip"):
        read_dataset(tmp_path)


def test_csv_unknown_named_column(tmp_path):
    (tmp_path / "data.csv").write_text("video,caption\na.mp4,a blue square\n")
    with pytest.raises(CogtuneError, match="no column 'prompt' for the captions"):
        read_dataset(tmp_path, caption_column="prompt")


def json_entries(tmp_path: Path) -> list:
    touch(tmp_path, "videos/a.mp4", "images/b.png")
    elsewhere = tmp_path / "elsewhere"
    touch(elsewhere, "c.mp4")
    return [
        {"file_path": "videos/a.mp4", "text": "a red circle", "type": "video"},
        {"file_path": "images/b.png", "text": "a blue square", "type": "image", "width": 64, "height": 32},
        {"file_path": str(elsewhere / "c.mp4"), "text": "a green triangle"},
        {"file_path": "videos/a.mp4", "text": "wrong type", "type": "image"},
        {"file_path": "videos/a.mp4", "text": 3},
        {"file_path": "videos/a.mp4", "text": "half a size", "width": 64},
        "not an object",
    ]


def check_json_dataset(dataset, tmp_path: Path, where: str) -> None:
    assert dataset.layout == "json"
    assert summary(dataset) == [
        ("videos/a.mp4", "a red circle", "video", 1),
        ("images/b.png", "a blue square", "image", 2),
        (str(tmp_path / "elsewhere/c.mp4"), "a green triangle", "video", 3),
    ]
    assert (dataset.items[1].width, dataset.items[1].height) == (64, 32)
    assert dataset.items[0].width is None
    assert dataset.items[2].path == (tmp_path / "elsewhere/c.mp4").resolve()
    assert [b.reason for b in dataset.bad] == [
        f"dataset.{where} 4: type is 'image' but 'a.mp4' is read as a video",
        f"dataset.{where} 5: text is missing or not a string",
        f"dataset.{where} 6: gives only one of width and height",
        f"dataset.{where} 7: expected an object with file_path and text, got str",
    ]
    assert dataset.bad[-1].source == f"dataset.{where} 7"


def test_json_list_with_relative_and_absolute_paths_and_images(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps(json_entries(tmp_path), indent=2))
    check_json_dataset(read_dataset(tmp_path), tmp_path, "json entry")


def test_jsonl_with_crlf_and_blank_lines(tmp_path):
    lines = [json.dumps(e) for e in json_entries(tmp_path)]
    (tmp_path / "dataset.jsonl").write_bytes(("\r\n".join(lines) + "\r\n\r\n").encode())
    check_json_dataset(read_dataset(tmp_path), tmp_path, "jsonl line")


def test_bad_json_names_file_and_line(tmp_path):
    (tmp_path / "dataset.json").write_text('[\n  {"file_path": "a.mp4", "text": "x"},\n  {"file_path": }\n]\n')
    with pytest.raises(CogtuneError, match=r"dataset.json line 3: not valid JSON"):
        read_dataset(tmp_path)


def test_bad_jsonl_line_names_the_line(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"file_path": "a.mp4", "text": "x"}\n\n{"file_path": \n')
    with pytest.raises(CogtuneError, match=r"data.jsonl line 3: not valid JSON"):
        read_dataset(tmp_path / "data.jsonl")


def test_detection_and_override(tmp_path):
    (tmp_path / "prompts.txt").write_text("x\n")
    (tmp_path / "videos.txt").write_text("a.mp4\n")
    (tmp_path / "meta.csv").write_text("video,caption\n")
    with pytest.raises(CogtuneError, match="several datasets found .*meta.csv"):
        detect_layout(tmp_path)
    assert detect_layout(tmp_path, "csv") == ("csv", tmp_path / "meta.csv")
    assert detect_layout(tmp_path, "txt") == ("txt", tmp_path / "videos.txt")
    assert detect_layout(tmp_path / "prompts.txt") == ("txt", tmp_path / "videos.txt")
    with pytest.raises(CogtuneError, match="no dataset found"):
        detect_layout(tmp_path, "json")
    with pytest.raises(CogtuneError, match="dataset not found"):
        detect_layout(tmp_path / "nowhere")


def test_whitespace_rules_by_the_whole_column_are_the_per_text_rules():
    """The reader strips paths and normalises captions by a few tests over the whole column where no text needs
    it: every mix of spaces, other whitespace, the "|" it joins by, newlines and non-ASCII text gets what the
    per-text rules give."""
    import random

    from cogtune.preprocess.datasets import _normalized, _stripped

    pieces = ["a", " ", "|", "\t", "\n", "\x0b", "\x1c", "\xa0", "é", "\u3000", "  "]
    rng, untouched = random.Random(0), 0
    for _ in range(20_000):
        texts = ["".join(rng.choices(pieces, k=rng.randint(0, 4))) for _ in range(rng.randint(0, 4))]
        assert _stripped(texts) == [text.strip() for text in texts], texts
        normalized = _normalized(texts)
        assert normalized == [" ".join(text.split()) for text in texts], texts
        untouched += normalized is texts
    assert untouched > 500  # the fast path was taken, often
