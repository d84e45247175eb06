#!/usr/bin/env bash
# One command for a GPU machine's first minutes: install what its image lacks, then measure (scripts/gpu_check.py:
# the real-size memory and speed table, the activation-offload tests, a 1-process FSDP export).
#
#   scripts/gpu_check.sh [gpu_check.py options]        # on the GPU machine, from the checkout's root or anywhere
#   scripts/gpu_check.sh --device cpu --arch tiny      # the same code on the CPU at tiny sizes (the suite runs it)
#
# A bare GPU image has torch, accelerate, peft and transformers but not diffusers, webdataset, braceexpand, decord2
# or importlib_metadata: scripts/fetch_wheels.sh puts their wheels in .whl/ beside the checkout (git-ignored), and
# they are installed from there without the network (--no-index) into /tmp/site. cogtune is not installed: the
# checkout *is* the package (its root holds shared/, train/, preprocess/), so a link named cogtune to it in
# /tmp/pkg makes `import cogtune` read the checkout as it is.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"

if ! "$python" -c "import cogtune, diffusers, webdataset" 2>/dev/null; then
    if compgen -G "$root/.whl/*.whl" >/dev/null; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$root"/.whl/*.whl
    fi
    mkdir -p /tmp/pkg
    ln -sfn "$root" /tmp/pkg/cogtune
    export PYTHONPATH="/tmp/pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    "$python" -c "import cogtune, diffusers, webdataset" || {
        echo "gpu_check.sh: cogtune does not import: run scripts/fetch_wheels.sh where pip reaches the index, and" \
             "carry .whl/ with the checkout" >&2
        exit 2
    }
fi
exec "$python" "$root/scripts/gpu_check.py" "$@"
