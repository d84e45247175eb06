"""Disk space: free bytes where a path will be written, sizes for people, and the one-line error of a write that
failed (a full disk above all), naming the path, the free space and what to do."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from .errors import CogtuneError

# torch.save reports a failed write as a RuntimeError of its zip writer or stream, not as an OSError
_TORCH_WRITE_FAILURES = ("inline_container", "iostream", "file write failed", "unexpected pos")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def free_bytes(path: Path) -> int:
    """Bytes free on the file system that holds `path` (or its nearest existing folder)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def is_write_failure(error: BaseException) -> bool:
    """Whether `error` is a failed write (full disk, quota, I/O error), as Python or torch.save raise it."""
    if isinstance(error, OSError):
        return True
    return isinstance(error, RuntimeError) and any(word in str(error) for word in _TORCH_WRITE_FAILURES)


def write_error(path: Path, error: BaseException, what: str, todo: str) -> CogtuneError:
    """`PATH: cannot write WHAT (REASON; N free on that disk): TODO`, one line."""
    if isinstance(error, OSError) and error.errno is not None:
        reason = error.strerror or errno.errorcode.get(error.errno, str(error))
    else:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    return CogtuneError(f"{path}: cannot write {what} ({reason}; {human_bytes(free_bytes(path))} free on that disk): "
                        f"{todo}")
