#!/usr/bin/env bash
# Set up (once) and run the whole test suite, slow end-to-end tests included.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -m "not slow" -x
source "$(dirname "$0")/_env.sh"
cd "$ROOT"
exec python -m pytest -q -ra "$@"
