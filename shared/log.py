"""cogtune's one logger: the standard `logging` module, aware of the process's rank in a launch.

Modules log through ``logging.getLogger(__name__)`` (every module sits under the ``cogtune`` logger) and a command
calls `setup_logging` once when it starts. What the run does (INFO, and DEBUG with ``--verbose``) goes to stdout,
warnings and errors to stderr, each line prefixed with the command's name. Under torchrun or ``accelerate
launch`` every rank runs the same code: rank 0 alone logs what the run does, and a warning or error of another
rank is logged with its rank named, so N processes do not print every line N times and need no guard of their own.
Progress bars and tables are rich's, never the logger's.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "cogtune"
"""The logger every cogtune module's ``logging.getLogger(__name__)`` sits under."""

QUIET, NORMAL, VERBOSE = logging.WARNING, logging.INFO, logging.DEBUG
"""--quiet: warnings and errors only; the default; --verbose: also what each step did."""

MAIN_ONLY = {"main_only": True}
"""``extra=`` of a warning every rank meets alike (a stop signal, a failed validation): rank 0 says it for all."""


def process_rank() -> int:
    """This process's rank in a launch (torchrun and accelerate set RANK), 0 when run alone."""
    return int(os.environ.get("RANK", "0"))


def verbosity(quiet: bool, verbose: bool) -> int:
    """The logging level of --quiet / --verbose (both given: --verbose, the one that hides nothing)."""
    return VERBOSE if verbose else QUIET if quiet else NORMAL


def shown(level: int = NORMAL) -> bool:
    """Whether this process's log shows a line of `level`: what rich draws beside the log (a summary table, a
    progress bar) asks this first, so it follows --quiet and the ranks as the log lines do."""
    return logging.getLogger(ROOT).isEnabledFor(level) and (process_rank() == 0 or level >= logging.WARNING)


class _RankFilter(logging.Filter):
    """Rank 0 logs everything; the other ranks only warnings and errors, and not those marked `MAIN_ONLY`."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or (record.levelno >= logging.WARNING and not getattr(record, "main_only", False))


class _CurrentStreamHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stdout`` or ``sys.stderr`` is when a record comes: test runners
    and rich's live progress display swap them, and a stream captured at setup would write around them."""

    def __init__(self, name: str, levels: range) -> None:
        super().__init__()
        self._name = name
        self.addFilter(lambda record: record.levelno in levels)

    @property
    def stream(self):  # type: ignore[override]
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the current one is always used
        pass


def setup_logging(prog: str, level: int = NORMAL) -> logging.Logger:
    """Make the ``cogtune`` logger write for command `prog` at `level`; returns it. Calling it again (another
    command in the same process, as tests do) replaces the handlers of the previous call."""
    logger = logging.getLogger(ROOT)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    rank = process_rank()
    name = prog if rank == 0 else f"{prog} [rank {rank}]"
    for stream, levels, prefix in (("stdout", range(0, logging.WARNING), f"{name}: "),
                                   ("stderr", range(logging.WARNING, 1000), f"{name}: %(levelname)s: ")):
        handler = _CurrentStreamHandler(stream, levels)
        handler.setFormatter(_LowerLevelFormatter(prefix + "%(message)s"))
        handler.addFilter(_RankFilter(rank))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # a root handler (a notebook's, a library's basicConfig) would print every line twice
    return logger


class _LowerLevelFormatter(logging.Formatter):
    """``warning:`` and ``error:`` in lower case, as the CLIs' one-line errors are written."""

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname  # the record is shared with any other handler: given back as it came
        record.levelname = level.lower()
        try:
            return super().format(record)
        finally:
            record.levelname = level
