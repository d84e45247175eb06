"""Dataset readers: the three layouts users bring, read into one list of items plus a list of bad items.

Layouts (auto-detected, or named explicitly):

- ``txt``: a folder with ``prompts.txt`` + ``videos.txt`` (one per line, paired by line number), and optionally
  ``images.txt`` (the first-frame images for image-to-video). Other file names via `caption_column` /
  `video_column`, as in the THUDM scripts.
- ``csv``: a CSV with a caption column and a video-path column (header names chosen by the user, or guessed).
- ``json``: a JSON list, or JSON Lines, of ``{"file_path", "text", "type": "video"|"image"}`` with optional
  ``width`` / ``height``.

Paths are relative to the folder holding the dataset file, or absolute. A problem with one item (missing file,
empty or undecodable caption) makes a `BadItem` naming the file and line, and the rest is read; a file that
cannot be read as its layout at all, or ``txt`` lists of different lengths, raise `CogtuneError`.
"""

from __future__ import annotations

import csv
import errno
import functools
import io
import json
import os
import stat as _stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ..shared.errors import CogtuneError
from ..shared.fingerprint import Resolver
from ..shared.video import is_image

Layout = Literal["txt", "csv", "json"]
Kind = Literal["video", "image"]
LAYOUTS: tuple[Layout, ...] = ("txt", "csv", "json")

PROMPTS_FILE, VIDEOS_FILE, IMAGES_FILE = "prompts.txt", "videos.txt", "images.txt"
CAPTION_HINTS = ("caption", "text", "prompt")
"""A CSV column whose lower-cased name contains one of these holds the captions, unless told otherwise."""
VIDEO_HINTS = ("video", "path", "file")
"""A CSV column whose lower-cased name contains one of these holds the paths, unless told otherwise."""

_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


@dataclass(frozen=True)
class DatasetItem:
    """One training sample as the dataset lists it."""

    source: str
    """The path exactly as written in the dataset (the key users recognise in reports)."""
    path: Path
    """The file, resolved against the dataset folder."""
    caption: str
    """The caption, whitespace runs collapsed to one space, with the id token (if any) in front."""
    kind: Kind
    """``video``, or ``image`` for a still used as a 1-frame sample."""
    image: Path | None
    """First-frame image for image-to-video (from ``images.txt``), resolved; None where the dataset gives none."""
    line: int
    """Where it is listed: line number (1-based) in the dataset file, or entry number in a JSON list."""
    width: int | None = None
    """Width declared by the dataset (JSON ``width``), so planning needs not open the file; None if not given."""
    height: int | None = None
    """Height declared by the dataset (JSON ``height``); None if not given."""
    stat: os.stat_result | None = field(default=None, compare=False, repr=False)
    """`path`'s stat when the dataset was read (planning trusts a content hash by its size and mtime without a
    second stat); None where the item was made otherwise."""


@dataclass(frozen=True)
class BadItem:
    """An entry of the dataset that cannot be used, and why."""

    source: str
    """The path as written, or where the entry is listed (``prompts.txt line 9``) where it gives no path."""
    reason: str
    """One line naming the dataset file, the line and the problem."""


@dataclass(frozen=True)
class Dataset:
    """What a dataset reader found."""

    layout: Layout
    file: Path
    """The dataset file read (for ``txt``: the video list)."""
    items: list[DatasetItem]
    bad: list[BadItem]


def read_dataset(
    location: Path | str,
    layout: Layout | None = None,
    *,
    caption_column: str | None = None,
    video_column: str | None = None,
    id_token: str | None = None,
) -> Dataset:
    """Read the dataset at `location` (a folder, or the dataset file itself).

    `layout` overrides detection. `caption_column` / `video_column` name the CSV columns (``csv``) or the
    caption and video list files (``txt``); `id_token` is prefixed to every caption ("TOKEN caption").
    """
    location = Path(location)
    if layout == "txt":
        # Named explicitly: the list files may have other names (caption_column / video_column), so no detection.
        file = location if location.is_file() else location / VIDEOS_FILE
    else:
        layout, file = detect_layout(location, layout)
    if layout == "txt":
        dataset = _read_txt(file.parent, caption_column or PROMPTS_FILE, video_column or VIDEOS_FILE)
    elif layout == "csv":
        dataset = _read_csv(file, caption_column, video_column)
    else:
        dataset = _read_json(file)
    if id_token:
        items = [replace(item, caption=f"{id_token} {item.caption}") for item in dataset.items]
        dataset = replace(dataset, items=items)
    return dataset


def detect_layout(location: Path | str, layout: Layout | None = None) -> tuple[Layout, Path]:
    """The layout of the dataset at `location` and the file to read (for ``txt``: the video list).

    A file is read by its suffix (or as `layout`); a folder must hold exactly one dataset of the layouts asked.
    """
    location = Path(location)
    if layout is not None and layout not in LAYOUTS:
        raise CogtuneError(f"unknown dataset layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if not location.exists():
        raise CogtuneError(f"{location}: dataset not found")
    if location.is_file():
        by_suffix = {".csv": "csv", ".json": "json", ".jsonl": "json", ".txt": "txt"}.get(location.suffix.lower())
        chosen = layout or by_suffix
        if chosen is None:
            raise CogtuneError(f"{location}: cannot tell the dataset layout from the suffix; name it (txt, csv, json)")
        if chosen == "txt":
            # A list file stands for its folder: the pairing is by the folder's prompts/videos files.
            return "txt", location.parent / VIDEOS_FILE
        return chosen, location
    found: list[tuple[Layout, Path]] = []
    if (location / PROMPTS_FILE).is_file() and (location / VIDEOS_FILE).is_file():
        found.append(("txt", location / VIDEOS_FILE))
    found += [("csv", p) for p in sorted(location.glob("*.csv"))]
    found += [("json", p) for p in sorted([*location.glob("*.json"), *location.glob("*.jsonl")])]
    if layout is not None:
        found = [f for f in found if f[0] == layout]
    if not found:
        wanted = f"a {layout} dataset" if layout else "prompts.txt + videos.txt, a CSV, or a JSON / JSONL file"
        raise CogtuneError(f"{location}: no dataset found (looked for {wanted})")
    if len(found) > 1:
        names = ", ".join(p.name if kind != "txt" else f"{PROMPTS_FILE} + {VIDEOS_FILE}" for kind, p in found)
        raise CogtuneError(f"{location}: several datasets found ({names}); pass the dataset file itself")
    return found[0]


def _read_txt(root: Path, prompts_name: str, videos_name: str) -> Dataset:
    prompts_file, videos_file, images_file = root / prompts_name, root / videos_name, root / IMAGES_FILE
    for f in (prompts_file, videos_file):
        if not f.is_file():
            raise CogtuneError(f"{f}: not found (the txt layout pairs {prompts_name} with {videos_name})")
    lists = read_paired_lists([prompts_file, videos_file, *([images_file] if images_file.is_file() else [])])
    captions, paths, images = lists[0], lists[1], (lists[2] if len(lists) == 3 else None)
    items: list[DatasetItem] = []
    bad: list[BadItem] = []
    resolver = Resolver()
    for index, source in enumerate(paths):
        line = index + 1
        at = f"{videos_name} line {line}"
        image = None
        if images is not None:
            image, problem, _ = _resolve(root, images[index], "image path", resolver)
            if problem:
                bad.append(BadItem(source, f"{IMAGES_FILE} line {line}: {problem}"))
                continue
        _add(items, bad, root, source, captions[index], None, image, line, at, resolver=resolver)
    return Dataset("txt", videos_file, items, bad)


def _read_csv(file: Path, caption_column: str | None, video_column: str | None) -> Dataset:
    rows = _csv_rows(file)
    if not rows:
        raise CogtuneError(f"{file}: empty CSV (no header row)")
    _, header = rows[0]
    header = [name.strip() for name in header]
    caption_at = _pick_column(file, header, caption_column, CAPTION_HINTS, "caption", exclude=None)
    video_at = _pick_column(file, header, video_column, VIDEO_HINTS, "video", exclude=caption_at)
    items: list[DatasetItem] = []
    bad: list[BadItem] = []
    resolver = Resolver()
    for line, row in rows[1:]:
        at = f"{file.name} line {line}"
        if max(caption_at, video_at) >= len(row):
            source = row[video_at] if video_at < len(row) else at
            bad.append(BadItem(source, f"{at}: row has {len(row)} fields, the header has {len(header)}"))
            continue
        _add(items, bad, file.parent, row[video_at], row[caption_at], None, None, line, at, resolver=resolver)
    return Dataset("csv", file, items, bad)


def _csv_rows(file: Path) -> list[tuple[int, list[str]]]:
    """Non-blank rows with the line each starts on (a quoted field may span lines)."""
    reader = csv.reader(io.StringIO(read_text_file(file), newline=""), strict=True)
    rows = []
    start = 1
    try:
        for row in reader:
            if any(field.strip() for field in row):
                rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as e:
        raise CogtuneError(f"{file} line {reader.line_num}: not valid CSV ({e})") from None
    return rows


def _pick_column(
    file: Path, header: list[str], asked: str | None, hints: tuple[str, ...], role: str, exclude: int | None
) -> int:
    columns = ", ".join(header)
    if asked is not None:
        if asked not in header:
            raise CogtuneError(f"{file}: no column {asked!r} for the {role}s (columns: {columns})")
        return header.index(asked)
    for index, name in enumerate(header):
        if index != exclude and any(hint in name.lower() for hint in hints):
            return index
    raise CogtuneError(
        f"{file}: cannot tell which column holds the {role}s (columns: {columns}); name it with --{role}-column"
    )


def _read_json(file: Path) -> Dataset:
    text = read_text_file(file)
    entries: list[tuple[int, str, Any]] = []
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CogtuneError(f"{file} line {e.lineno}: not valid JSON ({e.msg})") from None
        entries = [(number, f"{file.name} entry {number}", entry) for number, entry in enumerate(data, 1)]
    else:
        # JSON Lines: one object per line (also accepted under a .json name, a common mix-up).
        for number, line in enumerate(split_lines(text), 1):
            if not line.strip():
                continue
            try:
                entries.append((number, f"{file.name} line {number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise CogtuneError(f"{file} line {number}: not valid JSON ({e.msg})") from None
    items: list[DatasetItem] = []
    bad: list[BadItem] = []
    resolver = Resolver()
    for number, at, entry in entries:
        problem = _json_entry_problem(entry)
        if problem:
            source = entry.get("file_path") if isinstance(entry, dict) else None
            bad.append(BadItem(source if isinstance(source, str) else at, f"{at}: {problem}"))
            continue
        size = (entry["width"], entry["height"]) if "width" in entry else None
        _add(items, bad, file.parent, entry["file_path"], entry["text"], entry.get("type"), None, number, at, size,
             resolver=resolver)
    return Dataset("json", file, items, bad)


def _json_entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"expected an object with file_path and text, got {type(entry).__name__}"
    for key in ("file_path", "text"):
        if not isinstance(entry.get(key), str):
            return f"{key} is missing or not a string"
    if entry.get("type", "video") not in ("video", "image"):
        return f"type is {entry['type']!r}, expected 'video' or 'image'"
    if ("width" in entry) != ("height" in entry):
        return "gives only one of width and height"
    for key in ("width", "height"):
        value = entry.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"{key} is {value!r}, expected a positive integer"
    return None


def _add(
    items: list[DatasetItem],
    bad: list[BadItem],
    root: Path,
    source: str,
    caption: str,
    declared_kind: str | None,
    image: Path | None,
    line: int,
    at: str,
    size: tuple[int, int] | None = None,
    resolver: Resolver | None = None,
) -> None:
    """Check one entry and append it to `items`, or its reason to `bad`."""
    source = source.strip()
    # Whitespace runs (a CSV caption spanning lines, double spaces) become one space: equal captions stay equal.
    caption = " ".join(caption.split())
    path, problem, st = _resolve(root, source, "path", resolver)
    if problem is None:
        if _undecodable(caption):
            problem = "caption is not valid UTF-8"
        elif not caption:
            problem = "empty caption"
    kind: Kind = "image" if _is_image(source) else "video"
    if problem is None and declared_kind is not None and declared_kind != kind:
        problem = f"type is {declared_kind!r} but {Path(source).name!r} is read as a {kind}"
    if problem is not None:
        bad.append(BadItem(source or at, f"{at}: {problem}"))
        return
    width, height = size or (None, None)
    items.append(DatasetItem(source, path, caption, kind, image, line, width, height, st))


def _is_image(source: str) -> bool:
    """`is_image(source)`, looked up once per suffix (as pathlib takes the suffix of the last name)."""
    name = source.rstrip("/").rpartition("/")[2]
    if name in ("", ".", ".."):
        return is_image(source)
    dot = name.rfind(".")
    return _is_image_suffix(name[dot:] if 0 < dot < len(name) - 1 else "")


@functools.lru_cache(maxsize=256)
def _is_image_suffix(suffix: str) -> bool:
    return is_image(f"x{suffix}")


def _resolve(root: Path, written: str, what: str, resolver: Resolver | None = None
             ) -> tuple[Path | None, str | None, os.stat_result | None]:
    """(the real path of the file `written` names (relative to `root` unless absolute), None, its stat), or
    (None, a reason it cannot be used, None). One lstat per file where its folder was seen (see `Resolver`)."""
    written = written.strip()
    if not written:
        return None, f"empty {what}", None
    if _undecodable(written):
        return None, f"{what} is not valid UTF-8", None
    resolver = resolver or Resolver()
    try:
        named = os.path.expanduser(written) if written[0] == "~" else written
        real, st = resolver.stat(named if named[0] == "/" else f"{os.fspath(root)}/{named}")
    except OSError as e:  # what Path.exists takes for "no such file"; anything else raises, as it did
        if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
            raise
        return None, f"{written} not found", None
    if not _stat.S_ISREG(st.st_mode):
        return None, f"{written} is not a file", None
    return resolver.as_path(real), None, st


def read_text_file(file: Path) -> str:
    """A text file's content, BOM removed; bytes that are not UTF-8 survive as lone surrogates, so one bad
    line spoils only its own item (see `_undecodable`)."""
    try:
        data = file.read_bytes()
    except OSError as e:
        raise CogtuneError(f"{file}: cannot read ({e.strerror})") from None
    if data.startswith(_UTF16_BOMS):
        # Windows editors' "Unicode" is UTF-16.
        try:
            return data.decode("utf-16").removeprefix("\ufeff")
        except UnicodeDecodeError:
            raise CogtuneError(f"{file}: starts with a UTF-16 byte order mark but is not valid UTF-16") from None
    return data.removeprefix(_UTF8_BOM).decode("utf-8", errors="surrogateescape")


def read_paired_lists(files: list[Path]) -> list[list[str]]:
    """The lines of lists that pair by line number (prompts, videos, images), one list per file, all as long.

    Lists of different lengths are refused whole: one missing line would pair every later video with the next
    one's caption. Trailing blank lines count only as far as another list reaches (an editor's final blank
    lines are no entries; the empty images.txt line extract-frames writes for an unreadable last video is one).
    """
    texts = [read_text_file(f) for f in files]
    lines = [_all_lines(text) for text in texts]
    entries = [len(split_lines(text)) for text in texts]
    length = max(entries)
    short = min(range(len(files)), key=lambda i: len(lines[i]))
    if len(lines[short]) < length:
        long = entries.index(length)
        raise CogtuneError(f"{files[long]} has {entries[long]} lines but {files[short]} has {entries[short]}: "
                           f"the lists pair line by line, so they must have as many lines")
    return [ls[:length] for ls in lines]


def _all_lines(text: str) -> list[str]:
    """Every line, trailing blank ones included (only the end of the last line is no line of its own)."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    return lines[:-1] if lines[-1] == "" else lines


def split_lines(text: str) -> list[str]:
    """Lines split on LF only (CR of CRLF dropped), trailing blank lines removed."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _undecodable(text: str) -> bool:
    if text.isascii():  # the common case, in C: no lone surrogate
        return False
    return any("\udc80" <= ch <= "\udcff" for ch in text)
