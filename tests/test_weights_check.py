"""cogtrain refuses a model whose VAE or T5 weights are not those the store was encoded with, by a weights identity
that reads a few MB per component (`shared.fingerprint.weights_identity`), and accepts the same weights anywhere
and a transformer of its own."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from cogtune.shared import store as S
from cogtune.shared.errors import CogtuneError
from cogtune.shared.fingerprint import WEIGHTS_READ_BUDGET, weights_identity
from cogtune.shared.models import open_model
from cogtune.shared.zoo import make_tiny_model
from safetensors.torch import load_file, save_file
from train_helpers import cogtrain, losses


@pytest.fixture(scope="module")
def seed_1_model(tmp_path_factory) -> Path:
    """The tiny 5b again with seed 1: the same configs, other weights in every component."""
    return make_tiny_model("5b", tmp_path_factory.mktemp("tiny-5b-seed-1"), seed=1)


def with_component_of(model: Path, other: Path, component: str, out: Path) -> Path:
    """A copy of `model` whose `component`/ folder is `other`'s."""
    shutil.copytree(model, out)
    shutil.rmtree(out / component)
    shutil.copytree(other / component, out / component)
    return out


def assert_refused(result, out: Path, store: Path, words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {store}: "), result.output
    assert words in lines[0] and "re-encode with cogprep encode --model" in lines[0], lines[0]
    assert not out.exists(), f"a refused run wrote {sorted(p.name for p in out.iterdir())}"


# ---------------------------------------------------------------------------------------------------------
# cogtrain against the store


@pytest.mark.parametrize("component, words", [("vae", "its vae weights differ"),
                                              ("text_encoder", "its text encoder weights differ")])
def test_refuses_a_vae_or_text_encoder_of_other_weights(train_store, tiny_models, seed_1_model, tmp_path,
                                                        component, words):
    model = with_component_of(tiny_models["5b"], seed_1_model, component, tmp_path / "model")
    out = tmp_path / "run"
    result = cogtrain(train_store, model, out, "--max-steps", "1", expect=2)
    assert_refused(result, out, train_store, words)


def test_accepts_the_same_model_copied_elsewhere_and_a_transformer_of_its_own(train_store, tiny_models,
                                                                                 seed_1_model, tmp_path):
    copied = shutil.copytree(tiny_models["5b"], tmp_path / "elsewhere" / "copy", copy_function=shutil.copyfile)
    cogtrain(train_store, copied, tmp_path / "run-copy", "--max-steps", "1")
    assert sorted(losses(tmp_path / "run-copy")) == [1]

    # training on top of a merged or fine-tuned transformer is what the store is for
    merged = with_component_of(tiny_models["5b"], seed_1_model, "transformer", tmp_path / "merged")
    cogtrain(train_store, merged, tmp_path / "run-merged", "--max-steps", "1")
    assert sorted(losses(tmp_path / "run-merged")) == [1]


def test_a_model_folder_without_t5_weights_has_its_vae_checked_alone(train_store, tiny_models, seed_1_model,
                                                                      tmp_path):
    trimmed = shutil.copytree(tiny_models["5b"], tmp_path / "trimmed")
    (trimmed / "text_encoder" / "model.safetensors").unlink()  # the trainer never loads T5
    cogtrain(train_store, trimmed, tmp_path / "run", "--max-steps", "1")

    shutil.rmtree(trimmed / "vae")
    shutil.copytree(seed_1_model / "vae", trimmed / "vae")
    out = tmp_path / "refused"
    assert_refused(cogtrain(train_store, trimmed, out, "--max-steps", "1", expect=2), out, train_store,
                   "its vae weights differ")


def test_a_hub_model_has_its_vae_checked_alone(train_store, tiny_models, seed_1_model, tmp_path, monkeypatch):
    """From a hub id the trainer downloads the transformer and VAE only: T5 is never fetched to be checked, even
    where an earlier full download left it in the snapshot."""
    from cogtune.train import checks

    monkeypatch.setattr(checks, "is_hub_id", lambda source: True)
    manifest = S.Manifest.load(train_store)
    other_t5 = open_model(with_component_of(tiny_models["5b"], seed_1_model, "text_encoder", tmp_path / "t5"))
    checks.check_model_matches_store(other_t5, manifest, train_store)
    other_vae = open_model(with_component_of(tiny_models["5b"], seed_1_model, "vae", tmp_path / "vae"))
    with pytest.raises(CogtuneError, match="its vae weights differ"):
        checks.check_model_matches_store(other_vae, manifest, train_store)


def test_a_store_encoded_before_weights_were_recorded_falls_back_to_the_configs(train_store, tiny_models,
                                                                               seed_1_model, tmp_path):
    store = shutil.copytree(train_store, tmp_path / "older-store")
    manifest = S.Manifest.load(store)
    del manifest.model["weights_identity"]
    manifest.save(store)
    model = with_component_of(tiny_models["5b"], seed_1_model, "vae", tmp_path / "model")
    cogtrain(store, model, tmp_path / "run", "--max-steps", "1")
    assert sorted(losses(tmp_path / "run")) == [1]


def test_the_store_records_the_identity_of_the_vae_and_t5_it_was_encoded_with(train_store, tiny_models):
    recorded = json.loads((train_store / S.STORE_JSON).read_text())["model"]["weights_identity"]
    assert recorded == open_model(tiny_models["5b"]).weights_identity(("vae", "text_encoder"))
    assert set(recorded) == {"vae", "text_encoder"}


# ---------------------------------------------------------------------------------------------------------
# the identity itself


def test_identity_follows_tensors_not_files(tiny_models, seed_1_model, tmp_path):
    """Re-sharded or re-saved with other metadata, the same tensors keep their identity; one changed tensor, or
    the same weights in another dtype, change it."""
    original = tiny_models["5b"] / "text_encoder"
    tensors = load_file(original / "model.safetensors")
    names = sorted(tensors)
    resharded = tmp_path / "resharded"
    resharded.mkdir()
    shutil.copy(original / "config.json", resharded)
    save_file({n: tensors[n] for n in names[::2]}, resharded / "model-00001-of-00002.safetensors",
              metadata={"format": "pt", "saved_by": "another tool"})
    save_file({n: tensors[n] for n in names[1::2]}, resharded / "model-00002-of-00002.safetensors")
    assert weights_identity(resharded) == weights_identity(original)

    changed = dict(tensors)
    changed[names[0]] = changed[names[0]] + 1e-3
    save_file(changed, tmp_path / "changed.safetensors")
    save_file({n: t.bfloat16() for n, t in tensors.items()}, tmp_path / "bf16.safetensors")
    identities = set()
    for name in ("changed", "bf16"):
        (tmp_path / name).mkdir()
        (tmp_path / f"{name}.safetensors").rename(tmp_path / name / "model.safetensors")
        identities.add(weights_identity(tmp_path / name))
    assert weights_identity(original) not in identities and len(identities) == 2
    assert weights_identity(seed_1_model / "text_encoder") != weights_identity(original)
    assert weights_identity(tiny_models["5b"] / "tokenizer") is None  # no weight files: nothing to compare


def t5_xxl_shapes() -> dict[str, list[int]]:
    """The tensor shapes of CogVideoX's T5-XXL encoder (4.76 B parameters, bfloat16: 9.5 GB)."""
    d, ff, layers = 4096, 10240, 24
    table = {"shared.weight": [32128, d], "encoder.final_layer_norm.weight": [d],
             "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": [32, 64]}
    for i in range(layers):
        block = f"encoder.block.{i}.layer"
        for proj in "qkvo":
            table[f"{block}.0.SelfAttention.{proj}.weight"] = [d, d]
        table[f"{block}.0.layer_norm.weight"] = [d]
        table[f"{block}.1.DenseReluDense.wi_0.weight"] = [ff, d]
        table[f"{block}.1.DenseReluDense.wi_1.weight"] = [ff, d]
        table[f"{block}.1.DenseReluDense.wo.weight"] = [d, ff]
        table[f"{block}.1.layer_norm.weight"] = [d]
    return table


def write_sparse_safetensors(path: Path, shapes: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
    """A safetensors file of bfloat16 zeros with `shapes`, sparse on disk; returns each tensor's byte span."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    data = 8 + len(blob)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(data + offset)
    return {name: (data + h["data_offsets"][0], data + h["data_offsets"][1]) for name, h in header.items()}


def test_a_t5_sized_component_costs_a_few_mb_and_milliseconds(tmp_path, monkeypatch):
    """9.5 GB of T5 weights (a sparse file: its size, not its blocks) are identified from under 4 MB read."""
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    spans = write_sparse_safetensors(folder / "model.safetensors", t5_xxl_shapes())
    assert (folder / "model.safetensors").stat().st_size > 9.5e9

    read = []
    pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: read.append(n) or pread(fd, n, at))
    started = time.perf_counter()
    before = weights_identity(folder)
    elapsed = time.perf_counter() - started
    print(f"T5-XXL-sized identity: {sum(read) / 1e6:.2f} MB read in {len(read)} reads, {elapsed * 1e3:.0f} ms")
    assert sum(read) < WEIGHTS_READ_BUDGET and elapsed < 1.0

    # one fine-tuned attention weight, in the middle of the file, changes the identity
    begin, end = spans["encoder.block.12.layer.0.SelfAttention.q.weight"]
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek(begin)
        f.write(os.urandom(end - begin))
    assert weights_identity(folder) != before
