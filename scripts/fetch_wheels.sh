#!/usr/bin/env bash
# Download into .whl/ the wheels a bare GPU image lacks, for scripts/gpu_check.sh to install there without a
# network. Run it here, where pip reaches the package index; the wheels travel with the checkout (.whl/ is
# git-ignored). The image (Python 3.12, x86-64, CUDA) already has torch, accelerate, peft, transformers, pyarrow,
# safetensors, typer, imageio and the rest; it lacks these. --no-deps: their own needs are in the image, and
# pinning one version of each keeps pip from finding two.
#
#   scripts/fetch_wheels.sh [--python-version 3.12] [EXTRA==VERSION ...]   # e.g. bitsandbytes==0.50.2
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python_version=3.12
if [[ "${1:-}" == "--python-version" ]]; then python_version="$2"; shift 2; fi
# the versions the development venv runs, so the GPU runs the code the suite tested
packages=(diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7 decord2==3.4.0 importlib_metadata==10.2.0 "$@")
mkdir -p "$root/.whl"
python3 -m pip download --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$root/.whl" "${packages[@]}"
du -sh "$root/.whl"   # what travels with the checkout (a device call carries 64 MiB at most)
