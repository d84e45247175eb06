# Sourced by test.sh and quickstart.sh: create (once) and activate the project's virtual environment.
# Idempotent: re-installs only when pyproject.toml or this file changed. torch is pinned (COGTUNE_TORCH overrides) because
# an unpinned torch on these machines pulls gigabytes of CUDA packages; 2.13.0 finds a local CPU wheel here.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${COGTUNE_VENV:-$ROOT/.venv}"
TORCH_SPEC="${COGTUNE_TORCH:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment in $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.cogtune-install"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/_env.sh" | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing cogtune and its dependencies into $VENV (first run only)"
  python -m pip install -q --disable-pip-version-check --upgrade pip
  python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
  # decord2 replaced the old decord distribution, and both install the `decord` module: remove the old one first,
  # with a decord2 installed over it (uninstalling decord deletes files they share), so decord2 installs whole
  if python -m pip show -q decord >/dev/null 2>&1; then
    echo "replacing the old decord distribution with decord2"
    python -m pip uninstall -y -q decord
    if python -m pip show -q decord2 >/dev/null 2>&1; then python -m pip uninstall -y -q decord2; fi
  fi
  # the optional optimizers too (bnb, prodigy): the suite trains and resumes with each
  python -m pip install -q --disable-pip-version-check -e "$ROOT[test,bnb,prodigy]"
  echo "$want" >"$stamp"
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_TELEMETRY=1
