"""The one exception type users see: a one-line message naming the file and the problem, exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable[..., Any])


class CogtuneError(Exception):
    """Bad input or a refused request. The CLIs print ``error: <message>`` on one line and exit 2."""


def exit_on_user_error(fn: F) -> F:
    """Wrap a CLI command so a `CogtuneError` becomes one line on stderr and exit code 2, without a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CogtuneError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None

    return wrapper  # type: ignore[return-value]
