"""Provenance: a store and a run record the software that made them (cached latents depend on library code as
well as weights); cogprep inspect shows it; cogtrain says when the store was encoded under another diffusers."""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

from cogtune.shared import store as S
from prep_helpers import cogprep
from train_helpers import cogtrain

ROOT = Path(__file__).parents[1]


def test_a_store_records_the_versions_it_was_encoded_under(train_store):
    software = S.Manifest.load(train_store).software
    for package in ("cogtune", "torch", "diffusers", "transformers"):
        assert software[package] == version(package)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout (CI clones one): its commit, read without git
        assert software["cogtune_commit"] == head.stdout.strip()
    assert json.loads((train_store / S.STORE_JSON).read_text())["software"] == software
    shown = cogprep("inspect", train_store).stdout
    assert "encoded with diffusers" in shown and version("diffusers") in shown


def test_a_run_records_its_versions_and_notes_a_store_of_another_diffusers(train_store, tiny_models, tmp_path):
    store = shutil.copytree(train_store, tmp_path / "store")
    manifest = S.Manifest.load(store)
    manifest.software = {**manifest.software, "diffusers": "0.30.0"}
    manifest.save(store)
    run = tmp_path / "run"
    result = cogtrain(store, tiny_models["5b"], run, "--max-steps", "1")
    assert (f"cogtrain: warning: {store} was encoded under diffusers 0.30.0, this run has {version('diffusers')}; "
            "if the VAE's code changed between them") in result.stderr
    assert json.loads((run / "summary.json").read_text())["software"]["diffusers"] == version("diffusers")

    same = tmp_path / "same"
    assert "was encoded under diffusers" not in cogtrain(train_store, tiny_models["5b"], same, "--max-steps", "1").stderr
