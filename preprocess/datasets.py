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

Every layout is read into columns (`read_columns`: one list or array per field, one stat per entry in a tight
loop), which is all `cogprep status` and cogtrain's start-up check need to compare with a store's index;
`read_dataset` makes a `DatasetItem` of each usable entry of those columns, for planning. What a test over a
whole column can settle (no whitespace to strip or collapse, no image suffix, no empty caption, no ``~``) is
tested once, in C, over the column joined; only where that finds something are the entries taken one by one.
"""

from __future__ import annotations

import csv
import errno
import functools
import io
import json
import os
import stat as _stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from ..shared.errors import CogtuneError
from ..shared.fingerprint import Resolver
from ..shared.video import IMAGE_SUFFIXES, is_image

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


class FileStat(NamedTuple):
    """What planning takes of a file's stat (as `os.stat_result` names it): the pair a content hash is trusted by."""

    st_size: int
    st_mtime_ns: int


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
    stat: FileStat | os.stat_result | None = field(default=None, compare=False, repr=False)
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


@dataclass
class DatasetColumns:
    """What a dataset reader found, as columns: the usable entries in dataset order (element i of each list is
    entry i's), and the bad ones. No object per entry: a million entries compare with a store's index as they are,
    and `items` makes DatasetItems of those that need planning."""

    layout: Layout
    file: Path
    """The dataset file read (for ``txt``: the video list)."""
    source: list[str]
    caption: list[str]
    kind: list[Kind]
    real: list[str]
    """The real path of each entry's file."""
    size: np.ndarray
    """int64 `st_size` of each entry's file."""
    mtime_ns: np.ndarray
    """int64 `st_mtime_ns` of each entry's file."""
    line: list[int]
    bad: list[BadItem]
    image: list[Path | None] | None = None
    """Each entry's first-frame image (``txt`` with ``images.txt``); None where the dataset lists none."""
    declared_size: list[tuple[int, int] | None] | None = None
    """Each entry's (width, height) as the dataset declares it (``json``); None where no entry declares one."""

    def __len__(self) -> int:
        return len(self.source)

    def items(self, rows: Iterable[int] | None = None) -> list[DatasetItem]:
        """A DatasetItem of each entry in `rows` (default: all), in that order."""
        resolver = Resolver()  # its as_path parses each folder once
        out = []
        for i in range(len(self)) if rows is None else rows:
            width, height = (self.declared_size and self.declared_size[i]) or (None, None)
            out.append(DatasetItem(self.source[i], resolver.as_path(self.real[i]), self.caption[i], self.kind[i],
                                   self.image[i] if self.image else None, self.line[i], width, height,
                                   FileStat(int(self.size[i]), int(self.mtime_ns[i]))))
        return out


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
    columns = read_columns(location, layout, caption_column=caption_column, video_column=video_column,
                           id_token=id_token)
    return Dataset(columns.layout, columns.file, columns.items(), columns.bad)


def read_columns(
    location: Path | str,
    layout: Layout | None = None,
    *,
    caption_column: str | None = None,
    video_column: str | None = None,
    id_token: str | None = None,
) -> DatasetColumns:
    """Read the dataset at `location` into columns; the arguments are `read_dataset`'s."""
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
        dataset.caption = [f"{id_token} {caption}" for caption in dataset.caption]
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


def _read_txt(root: Path, prompts_name: str, videos_name: str) -> DatasetColumns:
    prompts_file, videos_file, images_file = root / prompts_name, root / videos_name, root / IMAGES_FILE
    for f in (prompts_file, videos_file):
        if not f.is_file():
            raise CogtuneError(f"{f}: not found (the txt layout pairs {prompts_name} with {videos_name})")
    lists = read_paired_lists([prompts_file, videos_file, *([images_file] if images_file.is_file() else [])])
    captions, paths, images = lists[0], lists[1], (lists[2] if len(lists) == 3 else None)
    del lists
    entries = _Entries(root, videos_name, "line", paths, captions, range(1, len(paths) + 1))
    if images is not None:
        entries.select_images(images)
    return entries.check("txt", videos_file)


def _read_csv(file: Path, caption_column: str | None, video_column: str | None) -> DatasetColumns:
    rows = _csv_rows(file)
    if not rows:
        raise CogtuneError(f"{file}: empty CSV (no header row)")
    _, header = rows[0]
    header = [name.strip() for name in header]
    caption_at = _pick_column(file, header, caption_column, CAPTION_HINTS, "caption", exclude=None)
    video_at = _pick_column(file, header, video_column, VIDEO_HINTS, "video", exclude=caption_at)
    entries = _Entries(file.parent, file.name, "line", [], [], [])
    for line, row in rows[1:]:
        if max(caption_at, video_at) >= len(row):
            at = f"{file.name} line {line}"
            source = row[video_at] if video_at < len(row) else at
            entries.refuse(line, BadItem(source, f"{at}: row has {len(row)} fields, the header has {len(header)}"))
            continue
        entries.sources.append(row[video_at])
        entries.captions.append(row[caption_at])
        entries.lines.append(line)
    return entries.check("csv", file)


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


def _read_json(file: Path) -> DatasetColumns:
    text = read_text_file(file)
    entries: list[tuple[int, str, Any]] = []
    word = "line"
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CogtuneError(f"{file} line {e.lineno}: not valid JSON ({e.msg})") from None
        entries = [(number, f"{file.name} entry {number}", entry) for number, entry in enumerate(data, 1)]
        word = "entry"
    else:
        # JSON Lines: one object per line (also accepted under a .json name, a common mix-up).
        for number, line in enumerate(split_lines(text), 1):
            if not line.strip():
                continue
            try:
                entries.append((number, f"{file.name} line {number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise CogtuneError(f"{file} line {number}: not valid JSON ({e.msg})") from None
    checked = _Entries(file.parent, file.name, word, [], [], [], kinds=[], sizes=[])
    for number, at, entry in entries:
        problem = _json_entry_problem(entry)
        if problem:
            source = entry.get("file_path") if isinstance(entry, dict) else None
            checked.refuse(number, BadItem(source if isinstance(source, str) else at, f"{at}: {problem}"))
            continue
        checked.sources.append(entry["file_path"])
        checked.captions.append(entry["text"])
        checked.lines.append(number)
        checked.kinds.append(entry.get("type"))
        checked.sizes.append((entry["width"], entry["height"]) if "width" in entry else None)
    return checked.check("json", file)


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


class _Entries:
    """A dataset's entries as the layout lists them, as parallel lists (no object per entry), and the bad ones
    found so far; `check` resolves and checks each, the same rules for every layout."""

    def __init__(self, root: Path, name: str, word: str, sources: list[str], captions: list[str],
                 lines: list[int] | range, kinds: list[str | None] | None = None,
                 sizes: list[tuple[int, int] | None] | None = None):
        self.root, self.name, self.word = root, name, word
        """Where entries are: "`name` `word` N" (``videos.txt line 3``, ``data.json entry 2``)."""
        self.sources, self.captions, self.lines = sources, captions, lines
        self.kinds, self.sizes = kinds, sizes
        """The type and (width, height) each entry declares (``json``), None where it declares none."""
        self.images: list[Path | None] | None = None
        self._bad: list[tuple[int, BadItem]] = []

    def refuse(self, line: int, bad: BadItem) -> None:
        self._bad.append((line, bad))

    def select_images(self, images: list[str]) -> None:
        """Pair each entry with its first-frame image (`images`, written as in ``images.txt``); an entry whose
        image cannot be used is refused."""
        resolver = Resolver()
        kept: list[int] = []
        self.images = []
        for index, written in enumerate(images):
            image, problem, _ = _resolve(self.root, written, "image path", resolver)
            if problem:
                self.refuse(self.lines[index], BadItem(self.sources[index],
                                                       f"{IMAGES_FILE} line {self.lines[index]}: {problem}"))
            else:
                kept.append(index)
                self.images.append(image)
        self.sources = [self.sources[i] for i in kept]
        self.captions = [self.captions[i] for i in kept]
        self.lines = [self.lines[i] for i in kept]

    def check(self, layout: Layout, file: Path) -> DatasetColumns:
        """Resolve and check every entry (one lstat each where its folder was seen, see `Resolver`): the usable
        ones as columns, a `BadItem` naming the file, line and problem for each of the rest."""
        sources = _stripped(self.sources)
        # whitespace runs (a CSV caption spanning lines, double spaces) become one space: equal captions stay equal
        captions = _normalized(self.captions)
        kinds = _kinds(sources)
        folder = os.fspath(self.root)
        reals, sizes, mtimes = Resolver().stat_files(
            (source if source[:1] == "/" else f"{folder}/{source}" for source in sources), len(sources))
        refused = self._judge(sources, captions, kinds, reals, sizes, mtimes)
        # each entry makes at most one bad item: in line order, they are in the order of the dataset
        self._bad.sort(key=lambda pair: pair[0])
        kept: list[int] | range = range(len(sources))
        lines = list(self.lines)
        if refused:
            kept = [i for i in kept if i not in refused]
            sources, captions, kinds, reals, lines = ([column[i] for i in kept]
                                                      for column in (sources, captions, kinds, reals, lines))
            sizes, mtimes = sizes[kept], mtimes[kept]
        return DatasetColumns(
            layout, file, sources, captions, kinds, reals, sizes, mtimes, lines, [bad for _, bad in self._bad],
            image=[self.images[i] for i in kept] if self.images is not None else None,
            declared_size=[self.sizes[i] for i in kept] if self.sizes and any(self.sizes) else None)

    def _judge(self, sources: list[str], captions: list[str], kinds: list[Kind], reals: list[str | None],
               sizes: np.ndarray, mtimes: np.ndarray) -> set[int]:
        """The positions of the entries refused (a bad item made for each), of those `Resolver.stat_files` could
        not take or that fail a cheap column-wise test (no caption, a ``~`` path, another kind declared, bytes
        that are not UTF-8); `_entry_problem` judges each of them, where the rules are spelled out, and fills in
        the real path, size and mtime of those it finds usable. It finds no problem with an entry it is not
        given: both ways give the same columns."""
        folder, resolver, declared = os.fspath(self.root), Resolver(), self.kinds
        # each pass in Python only where a test in C over the whole column finds something to look for
        judged = {i for i, real in enumerate(reals) if real is None} if None in reals else set()
        if "" in captions:
            judged.update(i for i, caption in enumerate(captions) if not caption)
        written = "".join(sources)
        if "~" in written:
            judged.update(i for i, source in enumerate(sources) if source[:1] == "~")
        if declared is not None:
            judged.update(i for i, (said, kind) in enumerate(zip(declared, kinds)) if said not in (None, kind))
        if not (written.isascii() and "".join(captions).isascii()):  # in C: no lone surrogate anywhere
            judged.update(i for i, (source, caption) in enumerate(zip(sources, captions))
                          if _undecodable(source) or _undecodable(caption))
        refused = set()
        for index in sorted(judged):
            real, problem, st = _entry_problem(folder, sources[index], captions[index], kinds[index],
                                               declared[index] if declared is not None else None, resolver)
            if problem is None:
                reals[index], sizes[index], mtimes[index] = real, st.st_size, st.st_mtime_ns
                continue
            at = f"{self.name} {self.word} {self.lines[index]}"
            self.refuse(self.lines[index], BadItem(sources[index] or at, f"{at}: {problem}"))
            refused.add(index)
        return refused


def _entry_problem(folder: str, source: str, caption: str, kind: Kind, declared: str | None, resolver: Resolver
                   ) -> tuple[str | None, str | None, os.stat_result | None]:
    """(real path, None, stat) of a usable entry (stripped `source`, normalised `caption`, the `kind` read from its
    name, the type it `declared`), or (None or the real path, what makes it unusable, None or its stat)."""
    real, problem, st = _locate(folder, source, "path", resolver)
    if problem is None:
        if _undecodable(caption):
            problem = "caption is not valid UTF-8"
        elif not caption:
            problem = "empty caption"
    if problem is None and declared is not None and declared != kind:
        problem = f"type is {declared!r} but {Path(source).name!r} is read as a {kind}"
    return real, problem, st


_PRINTABLE_ASCII = bytes(range(0x20, 0x7F))


def _stripped(texts: list[str]) -> list[str]:
    """Each text stripped of leading and trailing whitespace (str.strip); `texts` itself where none has any."""
    return texts if _only_inner_spaces(_joined(texts)) else [text.strip() for text in texts]


def _normalized(texts: list[str]) -> list[str]:
    """Each text's whitespace runs made one space, none at either end (" ".join(text.split())); `texts` itself
    where every text is so already."""
    joined = _joined(texts)
    if _only_inner_spaces(joined) and "  " not in joined:
        return texts
    return [" ".join(text.split()) for text in texts]


def _joined(texts: list[str]) -> str:
    """The texts joined by "|": a space beside a "|" is one at an end of a text, or beside a "|" inside one
    (which only makes `_only_inner_spaces` answer False where True was right: the texts then go one by one)."""
    return "|".join(texts)


def _only_inner_spaces(joined: str) -> bool:
    """Whether each text `_joined` made `joined` of is printable ASCII (no whitespace but the space), with no
    space first or last: a few tests in C over the whole (a million captions: 0.15 s of CPU, where a pass over
    each in Python took 0.6; deleting the printable bytes takes half the time of str.isprintable)."""
    return (joined.isascii() and not joined.encode("ascii").translate(None, _PRINTABLE_ASCII)
            and joined[:1] != " " and joined[-1:] != " " and " |" not in joined and "| " not in joined)


def _kinds(sources: list[str]) -> list[Kind]:
    """`_is_image` of each source as its kind. A source's last dot and the character before it (``4.mp4``) tell
    pathlib's suffix rule whole where that character is no slash and no slash follows: decided once per such tail
    (a dataset has a few dozen), and per source for the rest (no dot, a name that starts with its only dot).
    Where no image suffix is written anywhere (ASCII, any case: no source can have one), all are videos."""
    written = "".join(sources)
    if written.isascii():
        written = written.lower()
        if not any(suffix in written for suffix in IMAGE_SUFFIXES):
            return ["video"] * len(sources)
    tails = [source[source.rfind(".") - 1:] for source in sources]  # no dot, or one at 0: no "." at [1]
    by_tail = {tail: _tail_kind(tail) for tail in set(tails)}
    return [by_tail[tail] or ("image" if _is_image(source) else "video") for tail, source in zip(tails, sources)]


def _tail_kind(tail: str) -> Kind | None:
    """The kind of every source ending in `tail` (a character, the last dot, the rest), or None where the tail
    cannot tell it."""
    if len(tail) < 3 or tail[1] != "." or tail[0] == "/" or "/" in tail:
        return None
    return "image" if _is_image_suffix(tail[1:]) else "video"


def _is_image(source: str) -> bool:
    """`is_image(source)`, looked up once per suffix (as pathlib takes the suffix of the last name)."""
    dot = source.rfind(".")
    if source.rfind("/") + 1 < dot < len(source) - 1:  # the common case: a dot inside the last name, not first
        return _is_image_suffix(source[dot:])
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
    resolver = resolver or Resolver()
    real, problem, st = _locate(os.fspath(root), written.strip(), what, resolver)
    return (resolver.as_path(real) if real is not None else None), problem, st


def _locate(folder: str, written: str, what: str, resolver: Resolver
            ) -> tuple[str | None, str | None, os.stat_result | None]:
    """`_resolve` of a stripped `written` in `folder`, the real path as a string."""
    if not written:
        return None, f"empty {what}", None
    if _undecodable(written):
        return None, f"{what} is not valid UTF-8", None
    try:
        named = os.path.expanduser(written) if written[0] == "~" else written
        real, st = resolver.stat(named if named[0] == "/" else f"{folder}/{named}")
    except OSError as e:  # what Path.exists takes for "no such file"; anything else raises, as it did
        if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
            raise
        return None, f"{written} not found", None
    if not _stat.S_ISREG(st.st_mode):
        return None, f"{written} is not a file", None
    return real, None, st


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
    lines = [_all_lines(read_text_file(f)) for f in files]
    entries = [_entries(ls) for ls in lines]
    length = max(entries)
    short = min(range(len(files)), key=lambda i: len(lines[i]))
    if len(lines[short]) < length:
        long = entries.index(length)
        raise CogtuneError(f"{files[long]} has {entries[long]} lines but {files[short]} has {entries[short]}: "
                           f"the lists pair line by line, so they must have as many lines")
    return [ls[:length] for ls in lines]


def _all_lines(text: str) -> list[str]:
    """Every line, trailing blank ones included (only the end of the last line is no line of its own)."""
    lines = text.split("\n")
    if "\r" in text:
        lines = [line.removesuffix("\r") for line in lines]
    return lines[:-1] if lines[-1] == "" else lines


def _entries(lines: list[str]) -> int:
    """How many of `lines` are left when trailing blank lines are removed (`len(split_lines(...))` of their text)."""
    count = len(lines)
    while count and not lines[count - 1].strip():
        count -= 1
    return count


def split_lines(text: str) -> list[str]:
    """Lines split on LF only (CR of CRLF dropped), trailing blank lines removed."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _undecodable(text: str) -> bool:
    """Whether `text` holds bytes that were not UTF-8 (the lone surrogates `read_text_file` leaves)."""
    if text.isascii():  # the common case, in C: no lone surrogate
        return False
    try:
        text.encode("utf-8")  # in C: a text that encodes holds no surrogate at all
        return False
    except UnicodeEncodeError:
        return any("\udc80" <= ch <= "\udcff" for ch in text)
