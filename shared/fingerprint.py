"""Content fingerprints: of files, of folders of model weights, and of arbitrary JSON-able settings.

A file's content hash is remembered by (real path, size, mtime_ns) in a small JSON cache, so an unchanged
file is recognised without being read again; ``rehash=True`` re-reads it anyway.

A store's cache folder (`shared.store.CACHE_DIR`) holds two such caches: `FILES_CACHE`, the dataset's files (a
million entries for a million clips), and `MODEL_FILES_CACHE`, the model components' files (a few dozen), so that
fingerprinting the model (`cogprep status`, encode, inspect's preview) never parses the dataset's. Stores written
before the split keep their model files' hashes in `FILES_CACHE`: `model_file_hashes` falls back to it for a file
its own cache lacks, and keeps what it found there. Hashes are sha256, shortened
to 32 hex characters (128 bits) where they become keys. `weights_identity` is the cheap counterpart for model
weights: a few MB read per folder, whatever its size.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat as _stat
import sys
import threading
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write_text
from .errors import CogtuneError

KEY_HEX = 32
_CHUNK = 1 << 20
FILES_CACHE = "files.json"
"""The dataset files' hashes, in a store's cache folder."""
MODEL_FILES_CACHE = "model-files.json"
"""The model components' files' hashes, in a store's cache folder (see the module doc)."""


def hash_json(obj: Any) -> str:
    """A stable hash of a JSON-able value (keys sorted), e.g. encode settings or a config."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:KEY_HEX]


def json_fragment(value: Any) -> str:
    """`value` as `hash_json` writes it inside a list: ``hash_json([a, b])`` is the sha256 of
    ``"[" + json_fragment(a) + "," + json_fragment(b) + "]"``, so a key's constant parts are encoded once."""
    if type(value) is str:
        return _encode_str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def hash_fragments(fragments: str) -> str:
    """`hash_json` of a list given as its comma-joined `json_fragment`s: the same key, without json.dumps."""
    return hashlib.sha256(f"[{fragments}]".encode()).hexdigest()[:KEY_HEX]


_encode_str = json.encoder.encode_basestring_ascii  # what json.dumps does to a str (ensure_ascii)


def hash_bytes_of_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()[:KEY_HEX]


_PATH_CLASS = type(Path())
_FROM_PARTS = (getattr(_PATH_CLASS, "_from_parsed_parts", None)
               if sys.version_info < (3, 12) and hasattr(Path("/x"), "_parts") else None)
"""pathlib's own constructor from parsed parts (3.10 and 3.11); 3.12 changed pathlib's insides: plain Path."""


class Resolver:
    """`os.path.realpath` and `os.stat` of many files for the price of about one syscall each.

    realpath costs an lstat per path component (a file 7 folders deep: 7 syscalls, 80 us in Python); the real
    path of a file's folder is looked up once per folder here and the file itself is lstat-ed: where it is no
    symbolic link, that lstat is its stat and folder + name its real path, exactly what realpath gives. A
    symbolic link, a name of "." or "..", and a missing file take plain realpath and stat. Folders are
    remembered for the Resolver's lifetime: make one per pass over a dataset.
    """

    def __init__(self):
        self._folders: dict[str, str] = {}
        self._parts: dict[str, list[str]] = {}

    def stat(self, path: str | os.PathLike) -> tuple[str, os.stat_result]:
        """(real path, stat result following links) of `path`; OSError as os.stat raises it."""
        path = os.fspath(path)
        folder, _, name = path.rpartition("/")  # os.path.split, less its cost: realpath normalises the folder
        if name and name not in (".", ".."):
            real_folder = self._folders.get(folder)
            if real_folder is None:
                real_folder = self._folders[folder] = os.path.realpath(folder or ("/" if _ else "."))
            real = f"{real_folder}/{name}" if real_folder != "/" else f"/{name}"
            try:
                st = os.lstat(real)
            except OSError:
                st = None
            if st is not None and not _stat.S_ISLNK(st.st_mode):
                return real, st
        real = os.path.realpath(path)
        return real, os.stat(real)

    def stat_files(self, paths: Iterable[str], count: int) -> tuple[list[str | None], np.ndarray, np.ndarray]:
        """(real paths, int64 sizes, int64 mtime_ns) of the `count` `paths`, as `stat` gives them, where a path
        names a regular file by a name other than "." and ".." and is no symbolic link (a dataset's common entry),
        in one loop; a real path of None (size and mtime 0) for any other path (a link, a folder, a missing file),
        which `stat` answers one by one. No stat result is kept: a million of them would hold 200 MB."""
        folders, lstat, is_regular = self._folders, os.lstat, _stat.S_ISREG
        reals: list[str | None] = [None] * count
        sizes, mtimes = [0] * count, [0] * count  # made arrays at the end: a numpy item set costs 4 list ones
        last_folder = real_folder = None
        as_written = False
        for index, path in enumerate(paths):
            folder, slash, name = path.rpartition("/")
            if folder != last_folder:  # a dataset lists a folder's files together: one lookup for the run
                real_folder = folders.get(folder)
                if real_folder is None:
                    real_folder = folders[folder] = os.path.realpath(folder or ("/" if slash else "."))
                last_folder, as_written = folder, real_folder == folder != "/"
            real = path if as_written else f"{real_folder}/{name}" if real_folder != "/" else f"/{name}"
            try:
                st = lstat(real)
            except OSError:
                continue
            if is_regular(st.st_mode) and name not in ("", ".", ".."):
                reals[index], sizes[index], mtimes[index] = real, st.st_size, st.st_mtime_ns
        return reals, np.array(sizes, np.int64), np.array(mtimes, np.int64)

    def as_path(self, real: str) -> Path:
        """`Path(real)` for a real path `stat` gave, without pathlib parsing it again: its folder's parts are
        parsed once (pathlib's parse is most of the cost of a Path, 5 us; a dataset makes one per entry)."""
        folder, _, name = real.rpartition("/")
        if _FROM_PARTS is None or not folder or not name or name in (".", ".."):
            return Path(real)
        parts = self._parts.get(folder)
        if parts is None:
            parts = self._parts[folder] = Path(folder)._parts
        path = _FROM_PARTS("", "/", [*parts, name]) if parts[:1] == ["/"] else Path(real)
        path._str = real
        return path


class FileHashes:
    """Content hashes of files, trusted while a file's (size, mtime_ns) is unchanged.

    ``stats`` counts how many hashes were computed (``hashed``) and how many were taken on trust (``trusted``).
    `hash_files` hashes many files on threads and can journal each hash as it finishes: the journal (the cache's
    name + ``.journal``, one JSON line per hash) is read back with the cache and folded into it by `save`.
    """

    def __init__(self, cache_path: Path | None = None, rehash: bool = False, fallback: Path | None = None):
        """`fallback`: another cache, read (once, on the first file this one cannot vouch for) for what this one
        lacks; a hash found there is copied in, and written with this cache."""
        self.cache_path = cache_path
        self.rehash = rehash
        self.entries: dict[str, list] = _read_cache(cache_path)
        self.stats = {"hashed": 0, "trusted": 0}
        self._dirty = False
        self.resolver = Resolver()
        self._fallback, self._fallback_entries = fallback, None
        if cache_path is not None:
            self._replay_journal()

    @property
    def journal_path(self) -> Path | None:
        return None if self.cache_path is None else self.cache_path.with_name(self.cache_path.name + ".journal")

    def _replay_journal(self) -> None:
        """Take in the hashes a run killed before `save` journaled (a line cut short by the kill is skipped)."""
        try:
            lines = self.journal_path.read_text(errors="replace").splitlines()
        except OSError:
            return
        for line in lines:
            try:
                real, size, mtime, digest = json.loads(line)
            except (ValueError, TypeError):
                continue
            self.entries[real] = [size, mtime, digest]
            self._dirty = True

    def hash_files(self, files: Iterable[tuple[str, os.stat_result]], workers: int = 0, progress: bool = False,
                   journal: bool = False) -> None:
        """Hash those of `files` (real path, stat) the cache cannot vouch for, on `workers` threads (0: one per
        core, at most 8; sha256 and reads release the GIL), with a progress bar (files/s, ETA) when `progress`.

        With `journal`, each hash is appended to the journal as it finishes, so a run killed while hashing loses
        no finished hash: the next `FileHashes` of this cache reads them back and does not hash those files again.
        """
        todo = {real: st for real, st in files if not self._trusted(real, st)}
        if not todo:
            return
        from tqdm import tqdm

        workers = workers or min(8, os.cpu_count() or 1)
        journal_file = None
        if journal and self.journal_path is not None:
            self.journal_path.parent.mkdir(parents=True, exist_ok=True)
            journal_file = _Journal(self.journal_path)
        try:
            with ThreadPoolExecutor(workers) as pool, tqdm(total=len(todo), unit="file", desc="hashing",
                                                           disable=not progress, dynamic_ncols=True) as bar:
                running: dict = {}
                for item in [*todo.items(), None]:  # None: the end, wait for what is left
                    if item is not None:
                        running[pool.submit(_hash_and_journal, *item, journal_file)] = item
                    # a bounded number in flight: a million files never make a million futures
                    while running and (item is None or len(running) >= 4 * workers):
                        done, _ = wait(running, return_when=FIRST_COMPLETED)
                        for future in done:
                            self._record(*running.pop(future), future.result())
                            bar.update()
        finally:
            if journal_file is not None:
                journal_file.close()

    def _trusted(self, real: str, st: os.stat_result) -> bool:
        if self.rehash:
            return False
        hit = self.entries.get(real)
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return True
        if self._fallback is None:
            return False
        if self._fallback_entries is None:
            self._fallback_entries = _read_cache(self._fallback)
        hit = self._fallback_entries.get(real)
        if hit is None or hit[0] != st.st_size or hit[1] != st.st_mtime_ns:
            return False
        self.entries[real] = hit
        self._dirty = True
        return True

    def _record(self, real: str, st: os.stat_result, digest: str) -> None:
        self.entries[real] = [st.st_size, st.st_mtime_ns, digest]
        self.stats["hashed"] += 1
        self._dirty = True

    @staticmethod
    def stat_key(path: Path) -> tuple[str, int, int]:
        st = path.stat()
        return str(path.resolve()), st.st_size, st.st_mtime_ns

    def hash(self, path: Path, known: tuple[str, os.stat_result] | None = None) -> str:
        """The content hash of `path`; `known`: its (real path, stat) where the caller has them already."""
        return self.hash_and_stat(path, known)[0]

    def hash_and_stat(self, path: Path | str, known: tuple[str, os.stat_result] | None = None
                      ) -> tuple[str, os.stat_result]:
        """(content hash, stat) of `path`, with one lstat where its folder was seen before (see `Resolver`)."""
        real, st = known or self.resolver.stat(path)
        if self._trusted(real, st):
            self.stats["trusted"] += 1
            return self.entries[real][2], st
        self._record(real, st, hash_bytes_of_file(Path(path)))
        return self.entries[real][2], st

    def save(self) -> None:
        """Write the cache (atomically), then drop the journal it now holds."""
        if self.cache_path is not None and self._dirty:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.cache_path, json.dumps(self.entries))
            self._dirty = False
            self.journal_path.unlink(missing_ok=True)


def _read_cache(path: Path | None) -> dict[str, list]:
    """A hash cache's entries; none where it is absent or broken (a broken cache only costs re-hashing)."""
    if path is None or not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def model_file_hashes(cache_dir: Path, rehash: bool = False) -> FileHashes:
    """The hashes of the model components' files in a store's cache folder `cache_dir` (see the module doc)."""
    return FileHashes(cache_dir / MODEL_FILES_CACHE, rehash=rehash, fallback=cache_dir / FILES_CACHE)


def dataset_file_hashes(cache_dir: Path, rehash: bool = False) -> FileHashes:
    """The hashes of the dataset's files in a store's cache folder `cache_dir` (see the module doc)."""
    return FileHashes(cache_dir / FILES_CACHE, rehash=rehash)


class _Journal:
    """The hash journal, appended to from the hashing threads: one JSON line per hash, each handed to the kernel
    (written and flushed) as soon as its hash is known, so a kill -9 of the process never loses it."""

    def __init__(self, path: Path):
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()

    def add(self, real: str, st: os.stat_result, digest: str) -> None:
        line = json.dumps([real, st.st_size, st.st_mtime_ns, digest]) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def _hash_and_journal(real: str, st: os.stat_result, journal: _Journal | None) -> str:
    digest = hash_bytes_of_file(Path(real))
    if journal is not None:
        journal.add(real, st, digest)
    return digest


def folder_fingerprint(folder: Path, hashes: FileHashes, skip: Iterable[str] = ()) -> str:
    """Hash of every file below `folder`: relative names and contents (configs and weights alike)."""
    folder = Path(folder)
    skip = set(skip)
    parts = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in skip and not p.name.startswith("."):
            parts.append([p.relative_to(folder).as_posix(), hashes.hash(p)])
    if not parts:
        raise FileNotFoundError(f"{folder}: no files to fingerprint")
    return hash_json(parts)


WINDOWS_PER_TENSOR = 4
"""Byte windows sampled from each tensor, spread evenly from its first byte to its last."""
WINDOW_BYTES = 1024
WEIGHTS_READ_BUDGET = 4 << 20
"""Most bytes of windows read per folder: windows shrink for a folder of very many tensors."""
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")
"""Weight files without a readable tensor table (torch.save archives): sampled as one span, the whole file."""


def weights_identity(folder: Path) -> str | None:
    """A cheap identity of the weights in a model component folder; None where it holds no weight files.

    `folder_fingerprint` hashes every byte (9.5 GB for CogVideoX's T5): right for keying cached items, too slow
    for a start-up check on a cold cache. This reads a few MB instead: each safetensors file's tensor table
    (name, dtype, shape) and WINDOWS_PER_TENSOR windows of each tensor's bytes, at most WEIGHTS_READ_BUDGET
    of windows in all. A fine-tuned or re-initialised
    tensor changes nearly all its values, so its windows catch it; a change confined to bytes between windows
    (a few rows of an embedding) passes, and only the full fingerprint sees it. Tensors are taken by name,
    never by path, file or offset, so the same weights copied, moved or re-sharded keep their identity.
    """
    tensors = {}  # weight file -> its tensors as (name, dtype, shape, first byte, end)
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix == ".safetensors":
            tensors[path] = _safetensors_tensors(path)
        elif path.suffix in PICKLED_WEIGHTS:
            size = path.stat().st_size
            tensors[path] = [(path.name, "file", [size], 0, size)]
    count = sum(map(len, tensors.values()))
    if not count:
        return None
    window = max(1, min(WINDOW_BYTES, WEIGHTS_READ_BUDGET // (WINDOWS_PER_TENSOR * count)))
    records = []
    for path, table in tensors.items():
        fd = os.open(path, os.O_RDONLY)
        try:
            for name, dtype, shape, begin, end in table:
                samples = b"".join(os.pread(fd, size, at) for at, size in _windows(begin, end, window))
                records.append([name, dtype, shape, hashlib.sha256(samples).hexdigest()])
        finally:
            os.close(fd)
    # sorted whole: a name in two files (a diffusers .fp16 variant beside the full file) still orders stably
    return hash_json(sorted(records))


def _windows(begin: int, end: int, window: int) -> list[tuple[int, int]]:
    """(offset, size) of the windows sampled from bytes [begin, end): all of them when they are few."""
    length = end - begin
    if length <= WINDOWS_PER_TENSOR * window:
        return [(begin, length)]
    step = (length - window) // (WINDOWS_PER_TENSOR - 1)
    return [(begin + i * step, window) for i in range(WINDOWS_PER_TENSOR)]


def _safetensors_tensors(path: Path) -> list[tuple[str, str, list[int], int, int]]:
    """Each tensor of a safetensors file: (name, dtype, shape, first byte, end), as offsets in the file."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        length = int.from_bytes(os.pread(fd, 8, 0), "little")
        if size < 8 or 8 + length > size:
            raise CogtuneError(f"{path}: not a safetensors file (its header length does not fit its {size} bytes)")
        header = os.pread(fd, length, 8)
    finally:
        os.close(fd)
    try:
        table = json.loads(header)
        table.pop("__metadata__", None)  # free-form notes (the saving library's): not the weights
        data = 8 + length
        return [(name, t["dtype"], t["shape"], data + t["data_offsets"][0], data + t["data_offsets"][1])
                for name, t in table.items()]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise CogtuneError(f"{path}: not a safetensors file (unreadable header: {e!r})") from None
