"""scripts/quickstart.sh end to end for every variant it lists (COGTUNE_VARIANT), shortened to 2 clips and 2 steps:
the tiny model, the demo dataset and its validation set, cogprep encode and status, cogtrain with a checkpoint and
validation. An image-to-video model validates from the demo's first-frame images; 5b-I2V, whose learned positional
embeddings exist at its native size only, encodes at that size, cogprep's default.

The default variant (5b) starts from an empty folder, as a user does. The others start from a folder that already
holds the demo dataset (written once by scripts/make_demo_dataset.py with the script's own options) and the
session's tiny model of their variant (`make_tiny_model` with the script's seed): the script then skips both, as it
does on a re-run, and the suite saves two Python start-ups per variant."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cogtune.shared.models import open_model
from cogtune.shared.variants import VARIANTS

SCRIPTS = Path(__file__).parents[1] / "scripts"
QUICKSTART = SCRIPTS / "quickstart.sh"
CLIPS = 2
"""COGTUNE_QUICKSTART_CLIPS of every run: the demo dataset's clip count."""


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """The folder quickstart.sh writes as OUT/data with CLIPS clips, written once by the same script call."""
    out = tmp_path_factory.mktemp("quickstart-data") / "data"
    done = subprocess.run([sys.executable, str(SCRIPTS / "make_demo_dataset.py"), "--out", str(out), "--count",
                           str(CLIPS)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("slug", list(VARIANTS))
def test_quickstart_passes_for_every_variant(slug, tmp_path, demo_data, tiny_models):
    if slug != "5b":  # see the module docstring: the default variant alone starts from an empty folder
        shutil.copytree(demo_data, tmp_path / "data")
        shutil.copytree(tiny_models[slug], tmp_path / "model")
    # the suite's own environment: _env.sh finds it installed (scripts/test.sh set it up) and installs nothing
    env = {**os.environ, "COGTUNE_VARIANT": slug, "COGTUNE_QUICKSTART_STEPS": "2",
           "COGTUNE_QUICKSTART_CLIPS": str(CLIPS), "COGTUNE_VENV": sys.prefix}
    done = subprocess.run(["bash", str(QUICKSTART), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    model = open_model(tmp_path / "model")
    assert model.variant.slug == slug
    manifest = json.loads((tmp_path / "store" / "store.json").read_text())
    buckets = {b["name"] for b in manifest["buckets"]}
    assert sum(b["samples"] for b in manifest["buckets"]) >= 2
    if model.variant.fixed_size:
        assert buckets == {"x".join(map(str, model.native_size()))}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_loss"] > 0
    videos = sorted(p.name for p in (tmp_path / "run" / "validation").glob("*.mp4"))
    assert videos == ["step-000002-0.mp4", "step-000002-1.mp4"]  # one per validation prompt
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


def test_the_demo_validation_set_has_an_image_per_prompt(tmp_path):
    from cogtune.shared.demo import make_validation_set
    from PIL import Image

    folder = make_validation_set(tmp_path, count=3, seed=5)
    prompts = (folder / "prompts.txt").read_text().splitlines()
    images = (folder / "images.txt").read_text().splitlines()
    assert len(prompts) == len(images) == 3 and len(set(prompts)) == 3
    for name in images:  # relative to images.txt, as cogprep encode --validation-images reads them
        assert Image.open(folder / name).size == (48, 32)
    again = make_validation_set(tmp_path / "again", count=3, seed=5)
    assert (again / "prompts.txt").read_text() == (folder / "prompts.txt").read_text()  # same seed, same set
