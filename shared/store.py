"""The store format, in one file: what cogprep writes and cogtrain reads.

    STORE/
      store.json            manifest: format version, model fingerprints, encode settings, dataset, buckets
      index.parquet         one row per training sample; the commit point of every encode
      extras.safetensors    empty-prompt embedding (caption dropout), validation prompt embeddings and images
      report.json           what the last encode skipped, and why
      shards/<bucket>/*.tar video items of one bucket (bucket names look like 49x480x720)
      shards/text/*.tar     text items

Shards are WebDataset tar files. Each *item* is one WebDataset sample whose ``__key__`` is the item's content
key (32 hex characters, no dots) and whose members are safetensors and JSON only, never pickles:

    video item   KEY.latent.safetensors.gz   mean, logvar: unscaled VAE posterior, [C, F, H, W]
                 KEY.image.safetensors.gz    (I2V) clean [C, 1, H, W], noisy [K, C, 1, H, W], sigma [K] (float32)
                 KEY.json                    what the item was made from
    text item    KEY.text.safetensors.gz     embedding: the T5 output exactly as the pipeline computes it, [L, D]
                 KEY.json                    caption and its token count

Tensor members are gzip-compressed safetensors files (level 1): `gunzip` gives a plain safetensors file, and
``webdataset.WebDataset(url).decode()`` gunzips them itself. Why compress: the T5 embedding keeps all L
rows (the pipeline runs T5 on the padded prompt without an attention mask, so the padding rows carry
caption-dependent values the transformer sees at inference; trimming them would train on something else), so
bf16 alone is exactly half the naive fp32 layout, and bf16 exponents are far from random: gzip takes about a
fifth off near-Gaussian bf16 values. Costs for a CogVideoX-5b sample (49x480x720, 6.3 MB of bf16) on one slow
core: 0.2 s to pack (cogprep, on a thread beside the VAE), 0.06 s to inflate (the trainer's prefetch thread).

A sample (an index row) points at one video item and one text item by shard path, byte offset and size of
each member, so any member is read with one seek; a caption shared by many clips is stored once. Items are
content-keyed: a video item by (video content, clip window, bucket, resize mode, fps, VAE, dtype), a text item
by (caption, T5 + tokenizer, max length). Shards are written under a temporary name and renamed when closed;
index.parquet, which also holds the manifest, is replaced atomically last. A run killed at any moment leaves the previous index intact, and
closed shards it wrote are found again by `scan_shard` so their items need not be encoded twice.

The index also records the CRC-32 (``zlib.crc32``) of each member's *stored* bytes, the gzip stream as it lies
in the shard, computed as the writer adds it. `cogprep verify` compares it and parses only the safetensors header,
so it reads at the disk's speed (crc32 runs at about 2 GB/s a core); checking the gzip CRC inside instead means
inflating everything, at 0.1 GB/s a core. The gzip CRC still guards the inflated bytes wherever a member is read
(`tensors_from_bytes`), and `cogprep gc` moves a member's recorded CRC with its bytes, never one computed from a
copy. The CRC columns are null where nothing was recorded: a store written before them, an item a killed run left
that an encode adopted (`scan_shard` reads no data); verify inflates those members in full, as ``--deep`` does
every member. The columns needed no new format version: an older cogtune reads the columns it knows and ignores
these, and this one reads an index without them as all null.
"""

from __future__ import annotations

import fcntl
import gzip
import io
import json
import math
import os
import tarfile
import tempfile
import time
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path, atomic_write_text
from .errors import CogtuneError

if TYPE_CHECKING:  # torch is imported where tensors are made: planning a no-op encode never needs it
    import torch

FORMAT = "cogtune-store"
FORMAT_VERSION = 2
"""2: tensor members gzip-compressed."""
STORE_JSON = "store.json"
INDEX = "index.parquet"
EXTRAS = "extras.safetensors"
REPORT = "report.json"
SHARDS = "shards"
CACHE_DIR = ".cache"
"""cogprep's file-hash and probe caches: not part of the store's content."""
DAMAGED = "damaged.json"
"""The items `cogprep verify` found damaged, for the next encode to re-encode (absent when none are)."""
TEXT_BUCKET = "text"

# The members of the two kinds of cached item, and the tensors each member holds. A video item (one clip at one
# bucket) has a LATENT member and, for I2V, an IMAGE member; a text item (one caption) has a TEXT member; both
# have a META member (JSON, for people and for `scan_shard`).
LATENT = "latent.safetensors.gz"
MEAN, LOGVAR = "mean", "logvar"
"""LATENT's tensors: the VAE posterior's mean and log-variance [C, F, H, W], unscaled."""
IMAGE = "image.safetensors.gz"
CLEAN, NOISY, SIGMA = "clean", "noisy", "sigma"
"""IMAGE's tensors: the conditioning image's clean latent [C, 1, H, W], K noise-augmented ones [K, C, 1, H, W]
and their pixel noise levels [K]."""
TEXT = "text.safetensors.gz"
EMBEDDING = "embedding"
"""TEXT's tensor: the T5 embedding [text_length, D], exactly as the pipeline computes it."""
META = "json"

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # sample key: unique per row
        ("source", pa.string()),  # the path as written in the dataset
        ("kind", pa.string()),  # video | image
        ("bucket", pa.string()),  # FxHxW
        ("frames", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("caption", pa.string()),  # final caption (id token included)
        ("clip_start", pa.int64()),  # first source frame of the clip
        ("clip_step", pa.float64()),  # source frames between clip frames (fps resampling makes it fractional)
        ("source_size", pa.int64()),
        ("source_mtime_ns", pa.int64()),
        ("source_hash", pa.string()),  # content hash of the video (and of the conditioning image for I2V)
        ("video_key", pa.string()),
        ("text_key", pa.string()),
        ("shard", pa.string()),  # video item's shard, relative to the store
        ("latent_offset", pa.int64()),
        ("latent_size", pa.int64()),
        ("latent_crc", pa.uint32()),  # CRC-32 of the member's stored bytes; null where not recorded
        ("image_offset", pa.int64()),  # -1 when the store has no image latents (T2V)
        ("image_size", pa.int64()),
        ("image_crc", pa.uint32()),
        ("text_shard", pa.string()),
        ("text_offset", pa.int64()),
        ("text_size", pa.int64()),
        ("text_crc", pa.uint32()),
        ("text_tokens", pa.int32()),  # true token count of the caption (</s> included)
    ]
)


@dataclass
class Manifest:
    """store.json: everything needed to tell whether the store is current and what made it."""

    model: dict[str, Any]
    """source, variant name, and fingerprints of the VAE, text encoder and tokenizer (content and config), and
    the VAE's and text encoder's `weights_identity` (absent from stores encoded before it was recorded)."""
    settings: dict[str, Any]
    """Encode settings that change what is cached (buckets, fps, resize mode, dtype, noise variants, ...)."""
    dataset: dict[str, Any]
    """The dataset path and layout the store was encoded from."""
    buckets: list[dict[str, Any]] = field(default_factory=list)
    """Each bucket: name, frames, height, width, batch_size (what the trainer uses), samples."""
    software: dict[str, str] = field(default_factory=dict)
    """Versions of cogtune, torch, diffusers and transformers the store was encoded under (`shared.provenance`);
    empty for stores written before they were recorded."""
    format: str = FORMAT
    version: int = FORMAT_VERSION
    updated: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def save(self, store: Path) -> None:
        """Record the manifest: inside index.parquet (the commit point) and as the readable store.json."""
        if (Path(store) / INDEX).exists():
            write_index(store, read_index(store), self)
        atomic_write_text(Path(store) / STORE_JSON, self.to_json())

    @classmethod
    def load(cls, store: Path) -> Manifest:
        """The manifest committed with the index (store.json is its readable copy, and the fallback)."""
        if Path(store).is_file():
            check_store_folder(store)
        index = Path(store) / INDEX
        path = Path(store) / STORE_JSON
        text = _index_manifest(index) if index.exists() else None
        if text is None:
            try:
                text = path.read_text()
            except FileNotFoundError:
                raise CogtuneError(f"{path}: missing: not a cogtune store (run cogprep encode first)") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise CogtuneError(f"{path}: not valid JSON ({e})") from None
        if data.get("format") != FORMAT:
            raise CogtuneError(f"{path}: not a cogtune store manifest")
        if data.get("version") != FORMAT_VERSION:
            raise CogtuneError(
                f"{path}: store format version {data.get('version')}, this cogtune reads {FORMAT_VERSION}: "
                "encode the dataset again into a new folder"
            )
        fields = {k: data[k] for k in ("model", "settings", "dataset", "buckets", "format", "version", "updated")}
        return cls(**fields, software=data.get("software", {}))


# ---------------------------------------------------------------------------------------------------------
# tensors <-> bytes (gzip-compressed safetensors: never pickle)

COMPRESS_LEVEL = 1
"""gzip level of tensor members: level 6 takes only 2 % more off bf16 values, at 2-3x the time."""


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """A tensor member: safetensors bytes, gzip-compressed with a fixed mtime (same tensors, same bytes)."""
    from safetensors.torch import save as save_safetensors

    raw = save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    return gzip.compress(raw, compresslevel=COMPRESS_LEVEL, mtime=0)


class DamagedMember(CogtuneError):
    """A member's bytes do not decode: a failed gzip CRC or length, a truncated or garbled safetensors file."""


def tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        return load_safetensors(gzip.decompress(data))
    except (OSError, EOFError, zlib.error, SafetensorError) as e:  # gzip.BadGzipFile is an OSError
        raise DamagedMember(f"{type(e).__name__}: {e}") from None


def stored_crc(data: bytes) -> int:
    """The CRC-32 the index records of a member's stored bytes (see the module doc)."""
    return zlib.crc32(data)


SAFETENSORS_DTYPES = {"BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "F8_E4M3": ("float8_e4m3fn", 1),
                      "F8_E5M2": ("float8_e5m2", 1), "U16": ("uint16", 2), "I16": ("int16", 2),
                      "F16": ("float16", 2), "BF16": ("bfloat16", 2), "U32": ("uint32", 4), "I32": ("int32", 4),
                      "F32": ("float32", 4), "U64": ("uint64", 8), "I64": ("int64", 8), "F64": ("float64", 8)}
"""safetensors' dtype codes: (torch's name of the dtype, bytes an element)."""
MAX_HEADER_BYTES = 100_000_000
"""The largest safetensors header safetensors itself reads; ours take a few hundred bytes."""


def tensor_header(data: bytes) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype as torch names it, shape)} of a tensor member's tensors, from its safetensors header alone:
    inflates only the header's bytes. The tensors' byte ranges must tile the data that follows the header, and
    the inflated length the gzip trailer records must be header and data (what `tensors_from_bytes` checks by
    inflating it all). Parsed here, not by safetensors: its Python API reads a header only together with the
    whole buffer or from a file, and the point is to inflate a few hundred bytes of a member, not all of it."""
    try:
        length = int.from_bytes(_inflate_first(data, 8), "little")
        if length > MAX_HEADER_BYTES:
            raise DamagedMember(f"safetensors header of {length} bytes: garbled")
        header = _inflate_first(data, 8 + length)[8:]
        entries = json.loads(header)
        entries.pop("__metadata__", None)
        out, end = {}, 0
        for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"]):
            dtype, itemsize = SAFETENSORS_DTYPES[entry["dtype"]]
            shape, (begin, stop) = tuple(int(n) for n in entry["shape"]), entry["data_offsets"]
            if begin != end or stop - begin != itemsize * math.prod(shape):
                raise DamagedMember(f"safetensors header: {name} at bytes {begin}-{stop} of the data, not where "
                                    f"its shape {list(shape)} puts it")
            out[name], end = (dtype, shape), stop
    except (zlib.error, ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise DamagedMember(f"safetensors header unreadable ({type(e).__name__}: {e})") from None
    if len(header) != length or int.from_bytes(data[-4:], "little") != (8 + length + end) % 2**32:
        raise DamagedMember(f"safetensors header and data of {8 + length + end} bytes, the gzip trailer records "
                            f"{int.from_bytes(data[-4:], 'little')} (mod 2**32)")
    return out


def _inflate_first(data: bytes, size: int) -> bytes:
    """The first `size` bytes of the gzip stream `data` inflated (fewer where it ends first), inflating no more."""
    inflater = zlib.decompressobj(wbits=31)  # 31: a gzip header and trailer around the deflate stream
    out, fed, pending = b"", 0, b""
    # fed a few KB at a time: given all of `data`, zlib would copy the unread rest into `unconsumed_tail`, a
    # copy of the whole member that costs more than the CRC over it
    while len(out) < size and not inflater.eof:
        if not pending:
            if fed >= len(data):
                break
            pending, fed = data[fed:fed + INFLATE_STEP], fed + INFLATE_STEP
        out += inflater.decompress(pending, size - len(out))
        pending = inflater.unconsumed_tail
    return out


INFLATE_STEP = 4096
"""Bytes of a member `tensor_header` feeds the inflater at a time: a header a few hundred bytes long compresses
into the first of them."""


# ---------------------------------------------------------------------------------------------------------
# shards


@dataclass(frozen=True)
class Location:
    """Where one member's bytes lie: shard path relative to the store, byte offset of the data, size; and the
    CRC-32 of those bytes (`stored_crc`), where it was recorded (None from `scan_shard`, which reads no data)."""

    shard: str
    offset: int
    size: int
    crc: int | None = None


SHARD_MAX_BYTES = 1 << 30
"""A shard is closed and the next one started once it holds this many bytes..."""
SHARD_MAX_ITEMS = 1000
"""... or this many items (encodes and gc alike; cogprep encode --shard-max-bytes/--shard-max-items)."""


class ShardWriter:
    """Writes items into tar shards of one bucket folder, rolling to a new shard past `max_bytes`/`max_items`.

    A shard is written as ``.NAME.tar.tmp`` and renamed to ``NAME.tar`` when closed, so a finished shard is
    always whole. `add` returns the members' locations, valid once the shard is closed (`close` or roll).
    Shard names carry `prefix` (e.g. the run id and rank) so that concurrent writers never collide.
    """

    def __init__(self, store: Path, bucket: str, prefix: str, max_bytes: int = SHARD_MAX_BYTES,
                 max_items: int = SHARD_MAX_ITEMS):
        self.store = Path(store)
        self.folder = self.store / SHARDS / bucket
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.seq = 0
        self.closed_shards: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._items = 0
        self._name = ""

    def _open(self) -> None:
        while True:
            self._name = f"{self.prefix}-{self.seq:05d}.tar"
            self.seq += 1
            if not (self.folder / self._name).exists():
                break
        self._tmp = self.folder / f".{self._name}.tmp"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._items = 0

    @property
    def current_shard(self) -> str:
        return (self.folder / self._name).relative_to(self.store).as_posix()

    def add(self, key: str, members: dict[str, bytes]) -> dict[str, Location]:
        """Append one item; returns {member name: Location}. Keys must not contain dots (WebDataset rule)."""
        if "." in key or "/" in key:
            raise ValueError(f"item key {key!r} must not contain '.' or '/'")
        if self._tar is None:
            self._open()
        assert self._tar is not None
        out = {}
        for member, data in members.items():
            info = tarfile.TarInfo(f"{key}.{member}")
            info.size = len(data)
            info.mtime = 0  # shards depend on content only
            info.mode = 0o644
            header = len(info.tobuf(self._tar.format, self._tar.encoding, self._tar.errors))
            offset = self._tar.offset + header  # addfile works on a copy of info: compute where data lands
            self._tar.addfile(info, io.BytesIO(data))
            out[member] = Location(self.current_shard, offset, len(data), stored_crc(data))
        self._items += 1
        if self._items >= self.max_items or self._tar.offset >= self.max_bytes:
            self.close()
        return out

    def close(self) -> None:
        """Finish the open shard: flush, fsync, rename to its final name."""
        if self._tar is None:
            return
        self._tar.close()
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, self.folder / self._name)
        self.closed_shards.append(self.current_shard)
        self._tar = None

    def abort(self) -> None:
        """Drop the open shard (its items were never committed)."""
        if self._tar is not None:
            try:
                self._tar.close()
            except OSError:  # a full disk fails the tar's end blocks too: the file goes all the same
                pass
            finally:
                self._tmp.unlink(missing_ok=True)
                self._tar = None


def scan_shard(store: Path, shard: str) -> dict[str, dict[str, Location]]:
    """Read a closed shard's tar headers: {item key: {member: Location}}. Reads no member data."""
    out: dict[str, dict[str, Location]] = {}
    with tarfile.open(Path(store) / shard, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, member = info.name.partition(".")
            out.setdefault(key, {})[member] = Location(shard, info.offset_data, info.size)
    return out


def list_shards(store: Path) -> list[str]:
    """Every closed shard in the store, relative paths, sorted."""
    root = Path(store) / SHARDS
    if not root.exists():
        return []
    return sorted(p.relative_to(store).as_posix() for p in root.glob("*/*.tar"))


def remove_temp_shards(store: Path) -> int:
    """Delete shards left half-written by a killed run; returns how many."""
    root = Path(store) / SHARDS
    n = 0
    for p in root.glob("*/.*.tar.tmp") if root.exists() else []:
        p.unlink(missing_ok=True)
        n += 1
    return n


class ShardReader:
    """Random access to members: one seek and one read each, with a few shard files kept open."""

    def __init__(self, store: Path, max_open: int = 16):
        self.store = Path(store)
        self.max_open = max_open
        self._files: OrderedDict[str, Any] = OrderedDict()

    def read(self, shard: str, offset: int, size: int) -> bytes:
        f = self._files.get(shard)
        if f is None:
            f = open(self.store / shard, "rb")
            self._files[shard] = f
            if len(self._files) > self.max_open:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(shard)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise DamagedMember(f"{self.store / shard}: truncated at byte {offset + len(data)} (store damaged)")
        return data

    def tensors(self, shard: str, offset: int, size: int) -> dict[str, torch.Tensor]:
        return tensors_from_bytes(self.read(shard, offset, size))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __del__(self) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------
# index


@contextmanager
def store_lock(store: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on the store folder itself (no lock file to leave behind; the OS drops
    the lock when the process dies, so a kill never leaves the store locked)."""
    check_store_folder(store)
    fd = os.open(store, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CogtuneError(f"{store}: another cogprep (encode or gc) is working on this store; try again later") from None
        yield
    finally:
        os.close(fd)


def check_store_folder(store: Path) -> None:
    """Refuse, in one line, a store path that is a file (``STORE/index.parquet`` given for ``STORE``) or missing."""
    store = Path(store)
    if store.is_file():
        raise CogtuneError(f"{store}: a file, not a store: give the store's folder ({store.parent}), which holds "
                           f"{STORE_JSON} and {INDEX}")
    if not store.is_dir():
        raise CogtuneError(f"{store}: no such store")


def check_writable(store: Path) -> None:
    """Refuse, in one line, a store this process cannot write (a read-only mount or folder), before any work."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=store)
    except OSError as e:
        raise CogtuneError(f"{store}: cannot write to the store ({e.strerror}): encode into a writable folder") from None
    os.close(fd)
    os.unlink(probe)


MANIFEST_KEY = b"cogtune.manifest"


def write_index(store: Path, rows: list[dict[str, Any]] | pa.Table, manifest: Manifest | None = None) -> None:
    """Replace index.parquet atomically: the commit point of an encode. Rows (dicts, or an Arrow table of the
    index's columns) are sorted by key.

    The manifest is stored in the file's metadata, so rows and manifest are committed together; without
    `manifest`, the one already committed is kept (e.g. when `cogprep gc` only moves rows).
    """
    path = Path(store) / INDEX
    text = manifest.to_json() if manifest is not None else (_index_manifest(path) if path.exists() else None)
    schema = INDEX_SCHEMA.with_metadata({MANIFEST_KEY: text.encode()}) if text is not None else INDEX_SCHEMA
    table = _index_table(rows, schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _index_table(rows: list[dict[str, Any]] | pa.Table, schema: pa.Schema) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows.select(schema.names).cast(schema).sort_by("key")
    return pa.Table.from_pylist(sorted(rows, key=lambda r: r["key"]), schema=schema)


def index_holds(store: Path, rows: list[dict[str, Any]]) -> bool:
    """Whether index.parquet holds exactly `rows`, every column equal (the manifest aside): what lets an encode
    with nothing to change leave the index as it is."""
    table = _read_index_table(store, None)
    return table is not None and table.equals(_index_table(rows, INDEX_SCHEMA))


def _index_manifest(path: Path) -> str | None:
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as e:
        raise CogtuneError(f"{path}: unreadable index ({e})") from None
    value = metadata.get(MANIFEST_KEY)
    return value.decode() if value is not None else None


def read_index(store: Path, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The index rows (only `columns`, when given); [] when the store has no index yet."""
    table = _read_index_table(store, columns)
    return [] if table is None else table.to_pylist()


def read_index_columns(store: Path, columns: Sequence[str]) -> dict[str, list] | None:
    """The index's `columns`, each as one Python list (a column of a million strings costs a tenth of a second
    and its strings, where a million row dicts cost seconds and a GB); None when the store has no index yet."""
    table = _read_index_table(store, columns)
    return None if table is None else {name: table.column(name).to_pylist() for name in columns}


def read_index_table(store: Path, columns: Sequence[str]) -> pa.Table | None:
    """The index's `columns` as an Arrow table, for comparing or counting by columns without a Python object per
    row; None when the store has no index yet."""
    return _read_index_table(store, columns)


def _read_index_table(store: Path, columns: Sequence[str] | None) -> pa.Table | None:
    path = Path(store) / INDEX
    if not path.exists():
        return None
    schema = INDEX_SCHEMA if columns is None else pa.schema([INDEX_SCHEMA.field(name) for name in columns])
    try:
        # ParquetFile, not pq.read_table, and a cast only when needed: importing pyarrow.dataset and
        # pyarrow.compute costs a trainer several MB of memory and a second of start-up
        table = pq.ParquetFile(path).read(columns=schema.names)  # reads the columns the file has, of these
        for name in schema.names:
            if name in table.column_names:
                continue
            if name not in CRC_COLUMNS:
                raise CogtuneError(f"{path}: unreadable index (no column {name})")
            table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
        table = table.select(schema.names)
        return table if table.schema.equals(schema) else table.cast(schema)
    except (pa.ArrowInvalid, OSError) as e:
        raise CogtuneError(f"{path}: unreadable index ({e})") from None


def _read_index_dictionaries(store: Path, columns: Sequence[str]) -> pa.Table | None:
    """The index's `columns`, its string columns as dictionaries (codes into their distinct values) with one
    dictionary per column; None when the store has no index yet."""
    path = Path(store) / INDEX
    if not path.exists():
        return None
    strings = [name for name in columns if pa.types.is_string(INDEX_SCHEMA.field(name).type)]
    try:
        table = pq.ParquetFile(path, read_dictionary=strings).read(columns=list(columns))
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        raise CogtuneError(f"{path}: unreadable index ({e})") from None
    if any(not pa.types.is_dictionary(table.schema.field(name).type) for name in strings):
        raise CogtuneError(f"{path}: unreadable index (a column of text is not stored as text)")
    return table.unify_dictionaries()


def write_damaged(store: Path, items: dict[str, str], samples: list[dict[str, Any]]) -> None:
    """Record the damaged items `cogprep verify` found (item key -> problem, and the samples they belong to),
    for planning to re-encode; nothing damaged removes the record. Hold the store lock."""
    path = Path(store) / DAMAGED
    if not items:
        path.unlink(missing_ok=True)
        return
    atomic_write_text(path, json.dumps({"items": items, "samples": samples}, indent=1))


def read_damaged(store: Path) -> dict[str, str]:
    """item key -> problem, of the items `cogprep verify` found damaged since the last encode committed."""
    path = Path(store) / DAMAGED
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text())["items"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CogtuneError(f"{path}: unreadable ({e}): delete it and run cogprep verify again") from None


def read_index_row(store: Path, i: int, columns: Sequence[str]) -> dict[str, Any]:
    """Row `i` of the index, `columns` only: for naming one sample (a damaged one) without holding the rest."""
    return _read_index_table(store, columns).slice(i, 1).to_pylist()[0]


SAMPLE_COLUMNS = ("shard", "latent_offset", "latent_size", "image_offset", "image_size", "text_shard",
                  "text_offset", "text_size")
"""The index columns `read_sample` reads."""
CRC_COLUMNS = ("latent_crc", "image_crc", "text_crc")
"""The CRC-32s of the members' stored bytes: what `cogprep verify` compares; an index written before them lacks
them, and reads as if they were null."""
LOCATION_COLUMNS = (*SAMPLE_COLUMNS, *CRC_COLUMNS)
"""Every index column `row_locations` reads and `location_columns` writes."""


class IndexColumns:
    """A few index columns held compactly: strings as codes into their distinct values, integers as numpy.

    A trainer keeps the columns its reads need for every sample, in every rank: as `read_index` rows those 9
    columns take about 650 bytes a row (63 MB for 100,000 samples, measured with tracemalloc), as columns 60
    (5.8 MB; 60 MB for a million). String columns are read as Parquet dictionaries, so loading makes no Python
    object per row. `row(i)` gives row i as the dict `read_sample` takes.
    """

    def __init__(self, store: Path, columns: Sequence[str]):
        table = _read_index_dictionaries(store, columns)
        self._length = 0 if table is None else table.num_rows
        self._strings: dict[str, tuple[list[str], np.ndarray]] = {}
        self._numbers: dict[str, np.ndarray] = {}
        for name in columns if table is not None else ():
            self._hold(name, table.column(name))
        del table
        # Arrow's allocator keeps the read's buffers for reuse (110 MB for a million rows); a trainer never reads
        # the index again, so each rank hands them back and holds only the columns (60 bytes a row)
        pa.default_memory_pool().release_unused()

    def _hold(self, name: str, column: pa.ChunkedArray) -> None:
        """Keep a copy of `column` in numpy (and its distinct strings), none of Arrow's buffers."""
        if pa.types.is_dictionary(column.type):
            # Arrow's own codes: no Python object per row (a million rows load in a tenth of a second)
            codes = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
            self._strings[name] = (codes.dictionary.to_pylist(), codes.indices.to_numpy().astype(np.int32))
        else:
            self._numbers[name] = column.to_numpy().astype(np.int64)

    def __len__(self) -> int:
        return self._length

    def strings(self, name: str) -> list[str]:
        """Column `name` (a string column) for every row."""
        distinct, codes = self._strings[name]
        return [distinct[c] for c in codes]

    def shard_extents(self) -> dict[str, int]:
        """{shard: bytes of it the index needs}: the end of its last member, from the `SAMPLE_COLUMNS`."""
        needed: dict[str, int] = {}
        for shard, prefix in (("shard", "latent"), ("shard", "image"), ("text_shard", "text")):
            distinct, codes = self._strings[shard]
            offsets, sizes = self._numbers[f"{prefix}_offset"], self._numbers[f"{prefix}_size"]
            present = offsets >= 0  # -1: no member (a T2V store's image latents)
            ends = np.zeros(len(distinct), np.int64)
            np.maximum.at(ends, codes[present], (offsets + sizes)[present])
            for name, end in zip(distinct, ends.tolist()):
                needed[name] = max(needed.get(name, 0), end)
        return needed

    def row(self, i: int) -> dict[str, Any]:
        out: dict[str, Any] = {name: int(column[i]) for name, column in self._numbers.items()}
        out.update({name: distinct[codes[i]] for name, (distinct, codes) in self._strings.items()})
        return out


def check_shards(store: Path, index: IndexColumns) -> None:
    """Every shard the index points at exists and is as long as the index needs: one stat per shard, so a
    deleted or truncated shard is refused before training rather than met mid-epoch."""
    for shard, needed in sorted(index.shard_extents().items()):
        path = Path(store) / shard
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problem = f"missing (the index needs {needed} bytes of it)"
        else:
            if size >= needed:
                continue
            problem = f"truncated: {size} bytes, the index needs {needed}"
        raise CogtuneError(f"{path}: {problem}: run cogprep verify {store}, then cogprep encode to re-encode "
                           f"its samples")


def row_locations(row: dict[str, Any]) -> tuple[dict[str, Location], Location]:
    """Where an index row's cached members lie: ({LATENT: ..., IMAGE: ... for I2V}, the TEXT member). A row
    without the `CRC_COLUMNS` (the trainer reads only `SAMPLE_COLUMNS`) gives Locations without CRCs."""
    video = {LATENT: Location(row["shard"], row["latent_offset"], row["latent_size"], row.get("latent_crc"))}
    if row["image_offset"] >= 0:
        video[IMAGE] = Location(row["shard"], row["image_offset"], row["image_size"], row.get("image_crc"))
    return video, Location(row["text_shard"], row["text_offset"], row["text_size"], row.get("text_crc"))


MEMBER_COLUMNS = (("shard", "latent_offset", "latent_size"), ("shard", "image_offset", "image_size"),
                  ("text_shard", "text_offset", "text_size"))
"""(shard, offset, size) columns of each member a row points at, as `row_locations` reads them."""


def referenced_members(store: Path) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """{shard: (offsets, sizes)} of the members the index rows point at (a member shared by rows repeats): what
    `row_locations` gives for every row, as arrays, with no Python object per row; None when there is no index."""
    import pyarrow.compute as pc  # here, not at the top: a trainer never needs it (see `_read_index_table`)

    table = _read_index_table(store, SAMPLE_COLUMNS)
    if table is None:
        return None
    shards, offsets, sizes = [], [], []
    for shard, offset, size in MEMBER_COLUMNS:
        present = pc.greater_equal(table[offset], 0)  # -1: no such member (a T2V store's image latents)
        shards.append(table[shard].filter(present))
        offsets.append(table[offset].filter(present).to_numpy())
        sizes.append(table[size].filter(present).to_numpy())
    every_shard = pa.chunked_array([chunk for column in shards for chunk in column.chunks], pa.string())
    codes = pc.dictionary_encode(every_shard.combine_chunks())
    names, indices = codes.dictionary.to_pylist(), codes.indices.to_numpy()
    order = np.argsort(indices, kind="stable")  # grouped by shard, each group in row order
    offsets, sizes = np.concatenate(offsets)[order], np.concatenate(sizes)[order]
    counts = np.bincount(indices, minlength=len(names))
    ends = np.cumsum(counts)
    return {name: (offsets[end - n:end], sizes[end - n:end])
            for name, n, end in zip(names, counts.tolist(), ends.tolist())}


def location_columns(video: dict[str, Location], text: Location) -> dict[str, Any]:
    """The index columns that say where a sample's members lie: the inverse of `row_locations`."""
    latent, image = video[LATENT], video.get(IMAGE)
    return {
        "shard": latent.shard,
        "latent_offset": latent.offset,
        "latent_size": latent.size,
        "latent_crc": latent.crc,
        "image_offset": image.offset if image else -1,
        "image_size": image.size if image else 0,
        "image_crc": image.crc if image else None,
        "text_shard": text.shard,
        "text_offset": text.offset,
        "text_size": text.size,
        "text_crc": text.crc,
    }


def read_sample(reader: ShardReader, row: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every cached tensor of one index row: MEAN, LOGVAR, EMBEDDING (+ CLEAN, NOISY, SIGMA for I2V)."""
    video, text = row_locations(row)
    out = {}
    for location in (*video.values(), text):
        out.update(reader.tensors(location.shard, location.offset, location.size))
    return out


def bytes_by_part(store: Path) -> dict[str, int]:
    """Bytes on disk of the store's parts: video shards, text shards, index, extras, other files (manifest,
    report, a killed run's leftovers); the file-hash and probe caches left out."""
    store = Path(store)
    out: Counter[str] = Counter()
    for p in store.rglob("*"):
        if not p.is_file() or CACHE_DIR in p.relative_to(store).parts:
            continue
        rel = p.relative_to(store).parts
        if rel[0] == SHARDS:
            out["text shards" if rel[1] == TEXT_BUCKET else "video shards"] += p.stat().st_size
        elif p.name in (INDEX, EXTRAS):
            out[p.name] += p.stat().st_size
        else:
            out["other files"] += p.stat().st_size
    return dict(out)


def disk_bytes(store: Path) -> int:
    return sum(bytes_by_part(store).values())


# ---------------------------------------------------------------------------------------------------------
# extras: store-level tensors


def write_extras(store: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """extras.safetensors: ``empty_embedding`` [L, D], ``validation_embedding_{i}`` and, for I2V,
    ``validation_image_{i}`` latents; `metadata` (strings) keeps the validation prompts."""
    from safetensors.torch import save_file

    with atomic_path(Path(store) / EXTRAS) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_extras_metadata(store: Path) -> dict[str, str] | None:
    """extras.safetensors' metadata from its JSON header alone (no tensor read, no torch); None if absent."""
    from safetensors import SafetensorError, safe_open

    path = Path(store) / EXTRAS
    try:
        with safe_open(str(path), framework="numpy") as f:  # the header alone: no tensor is read
            return dict(f.metadata() or {})
    except (OSError, SafetensorError):
        return None


def read_extras(store: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(store) / EXTRAS
    if not path.exists():
        raise CogtuneError(f"{path}: missing (re-run cogprep encode)")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
