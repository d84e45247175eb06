"""Helpers for the cogprep tests: run the CLI in-process, read a whole store back, edit txt datasets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from cogtune.preprocess.cli import app
from cogtune.shared import store as S
from cogtune.shared.video import write_video
from typer.testing import CliRunner

TINY_BUCKETS = Path(__file__).parents[1] / "scripts" / "tiny_buckets.yaml"


def cogprep(*args: str, expect: int = 0):
    """Run `cogprep ARGS` in this process (no workers, no progress bars); returns the click Result."""
    argv = [str(a) for a in args]
    if argv[0] == "encode":
        argv += ["--workers", "0", "--no-progress"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == expect, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result


def encode(dataset: Path, model: Path, store: Path, *extra: str, expect: int = 0):
    """cogprep encode with the tiny buckets, unless `extra` names a --resolution."""
    buckets = () if "--resolution" in extra else ("--buckets", TINY_BUCKETS)
    return cogprep("encode", dataset, "--model", model, "--out", store, *buckets, *extra, expect=expect)


def moved_store(store: Path, dataset: Path, model: Path, out: Path) -> Path:
    """A private copy at `out` of `store`, encoded from a copy of `dataset` (the same files, mtimes kept), as if a
    user had moved both. A no-op encode there, which must encode nothing, records the sources' hashes under their
    new paths, so later encodes trust unchanged files as they would in the store where they were encoded."""
    shutil.copytree(store, out)
    encode(dataset, model, out)
    assert report(out)["encoded"] == {"videos": 0, "texts": 0}, "a moved store re-encoded items"
    return out


def report(store: Path) -> dict:
    return json.loads((Path(store) / S.REPORT).read_text())


def store_content(store: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{sample key: every cached tensor} through random access: what a store *means*, independent of layout."""
    reader = S.ShardReader(store)
    out = {}
    for row in S.read_index(store):
        tensors = S.read_sample(reader, row)
        out[row["key"]] = {**tensors, "caption": row["caption"], "bucket": row["bucket"], "source": row["source"]}
    reader.close()
    return out


def assert_same_content(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].keys() == b[key].keys()
        for name, value in a[key].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[key][name]), f"{key}.{name} differs"
            else:
                assert value == b[key][name]


def read_lines(path: Path) -> list[str]:
    return Path(path).read_text().splitlines()


def write_lines(path: Path, lines: list[str]) -> None:
    Path(path).write_text("\n".join(lines) + "\n")


def add_clip(dataset: Path, name: str, caption: str, frames: int = 20, height: int = 32, width: int = 48,
             seed: int = 0) -> None:
    """Write a new random clip into a txt dataset and list it."""
    rng = np.random.default_rng(seed)
    video = (rng.random((frames, height, width, 3)) * 255).astype(np.uint8)
    write_video(dataset / "videos" / name, video, fps=8)
    write_lines(dataset / "videos.txt", read_lines(dataset / "videos.txt") + [f"videos/{name}"])
    write_lines(dataset / "prompts.txt", read_lines(dataset / "prompts.txt") + [caption])
