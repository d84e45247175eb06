"""Content fingerprints: of files, of folders of model weights, and of arbitrary JSON-able settings.

A file's content hash is remembered by (real path, size, mtime_ns) in a small JSON cache, so an unchanged
file is recognised without being read again; ``rehash=True`` re-reads it anyway. Hashes are sha256, shortened
to 32 hex characters (128 bits) where they become keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text

KEY_HEX = 32
_CHUNK = 1 << 20


def hash_json(obj: Any) -> str:
    """A stable hash of a JSON-able value (keys sorted), e.g. encode settings or a config."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:KEY_HEX]


def hash_bytes_of_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()[:KEY_HEX]


class FileHashes:
    """Content hashes of files, trusted while a file's (size, mtime_ns) is unchanged.

    ``stats`` counts how many hashes were computed (``hashed``) and how many were taken on trust (``trusted``).
    """

    def __init__(self, cache_path: Path | None = None, rehash: bool = False):
        self.cache_path = cache_path
        self.rehash = rehash
        self.entries: dict[str, list] = {}
        self.stats = {"hashed": 0, "trusted": 0}
        self._dirty = False
        if cache_path is not None and cache_path.exists():
            try:
                self.entries = json.loads(cache_path.read_text())
            except (OSError, ValueError):
                self.entries = {}  # a broken cache only costs re-hashing

    @staticmethod
    def stat_key(path: Path) -> tuple[str, int, int]:
        st = path.stat()
        return str(path.resolve()), st.st_size, st.st_mtime_ns

    def hash(self, path: Path) -> str:
        real, size, mtime = self.stat_key(Path(path))
        hit = self.entries.get(real)
        if not self.rehash and hit is not None and hit[0] == size and hit[1] == mtime:
            self.stats["trusted"] += 1
            return hit[2]
        digest = hash_bytes_of_file(Path(path))
        self.stats["hashed"] += 1
        self.entries[real] = [size, mtime, digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        if self.cache_path is not None and self._dirty:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.cache_path, json.dumps(self.entries))
            self._dirty = False


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
