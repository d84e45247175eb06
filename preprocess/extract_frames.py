"""`cogprep extract-frames`: the first frame of each video of a txt dataset as the I2V conditioning image."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from ..shared.atomic import atomic_write_text
from ..shared.errors import CogtuneError
from ..shared.video import read_frames
from .datasets import (  # the txt reader's own line rules: line N here is line N there
    IMAGES_FILE,
    PROMPTS_FILE,
    VIDEOS_FILE,
    BadItem,
    read_paired_lists,
)
from .store_inspect import save_png

log = logging.getLogger(__name__)


@dataclass
class FrameExtraction:
    images_file: Path
    written: int
    bad: list[BadItem]


def extract_first_frames(dataset: Path, out_dir: str = "images", overwrite: bool = False) -> FrameExtraction:
    """Write the first frame of every video of a txt dataset to ``out_dir/<stem>.png`` and list them in
    images.txt, line for line with videos.txt. A video that cannot be read gets an empty line (the txt reader
    then reports that item as bad, as encode would) and is returned in `bad`; images.txt is written last,
    atomically."""
    root = Path(dataset)
    root = root.parent if root.is_file() else root
    videos_file, images_file = root / VIDEOS_FILE, root / IMAGES_FILE
    if not videos_file.is_file():
        raise CogtuneError(f"{videos_file}: not found (extract-frames works on txt datasets: prompts.txt + videos.txt)")
    if images_file.exists() and not overwrite:
        raise CogtuneError(f"{images_file}: exists; pass --overwrite to replace it")
    # images.txt pairs with both lists by line number: lists of different lengths are refused as encode refuses them
    prompts_file = root / PROMPTS_FILE
    lists = read_paired_lists([videos_file, *([prompts_file] if prompts_file.is_file() else [])])
    written_paths = [line.strip() for line in lists[0]]
    names = _image_names(written_paths, out_dir)
    if not overwrite:
        taken = [n for n in dict.fromkeys(names.values()) if (root / n).exists()]
        if taken:
            raise CogtuneError(f"{root / taken[0]}: exists; pass --overwrite to replace it")
    lines, bad, done = [], [], set()
    for number, written in enumerate(written_paths, 1):
        at = f"{VIDEOS_FILE} line {number}"
        try:
            if not written:
                raise CogtuneError("empty path")
            name = names[written]
            if name not in done:  # a video listed twice is written once
                frame = read_frames(root / Path(written).expanduser(), [0])[0]
                save_png(Image.fromarray(frame), root / name)
                log.debug("%s: first frame of %s", root / name, written)
                done.add(name)
            lines.append(name)
        except CogtuneError as e:
            bad.append(BadItem(written or at, f"{at}: {e}"))
            lines.append("")
    atomic_write_text(images_file, "".join(line + "\n" for line in lines))
    return FrameExtraction(images_file, len(done), bad)


def _image_names(written_paths: list[str], out_dir: str) -> dict[str, str]:
    """Image path (relative to the dataset) for each video path: ``out_dir/<stem>.png``; a stem that two different
    videos share (a/clip.mp4, b/clip.mp4) gets the line number of its later listing appended."""
    names: dict[str, str] = {}
    used: set[str] = set()
    for number, written in enumerate(written_paths, 1):
        if not written or written in names:
            continue
        stem = PurePosixPath(written).stem
        while stem in used:
            stem = f"{stem}-{number}"
        used.add(stem)
        names[written] = (PurePosixPath(out_dir) / f"{stem}.png").as_posix()
    return names
