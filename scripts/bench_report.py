"""What every benchmark in scripts/ does with its results after printing its table: print them as JSON (the
last thing on stdout, for a reader of the log) and, with the script's JSON option, write the same JSON to a file
(atomically, so a killed benchmark leaves no half-written file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cogtune.shared.atomic import atomic_write_text


def print_json(results: Any, path: Path | None) -> None:
    text = json.dumps(results, indent=2)
    print(text)
    if path is not None:
        atomic_write_text(Path(path), text + "\n")
