"""Each cogprep rank loads T5 and the VAE straight onto its device: no copy of the whole component in host memory
first (#17). The meta device stands in for an accelerator here: what lands there takes no host memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cogtune.shared.models import Model, open_model
from prep_helpers import encode

BENCH = Path(__file__).parents[1] / "scripts" / "bench_host_memory.py"


def test_loaders_put_every_weight_on_the_device_asked(tiny_models):
    model = open_model(tiny_models["2b"])
    for module in (model.load_vae("bfloat16", "meta"), model.load_text_encoder("bfloat16", "meta")):
        assert {p.device.type for p in module.parameters()} == {"meta"}
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
        assert not module.training
    for module in (model.load_vae("float32"), model.load_text_encoder("float32")):  # no device: the CPU, as loaded
        assert {p.device.type for p in module.parameters()} == {"cpu"}


def test_cogprep_encode_loads_t5_and_the_vae_onto_its_device(tiny_models, demo_txt, tmp_path, monkeypatch):
    asked = []
    for name in ("load_vae", "load_text_encoder"):
        load = getattr(Model, name)

        def spy(self, dtype="float32", device=None, _load=load, _name=name):
            asked.append((_name, str(device)))
            return _load(self, dtype, device)

        monkeypatch.setattr(Model, name, spy)
    encode(demo_txt, tiny_models["5b"], tmp_path / "store")
    assert sorted(asked) == [("load_text_encoder", "cpu"), ("load_vae", "cpu")]


@pytest.mark.slow
def test_loading_onto_the_device_keeps_no_copy_in_host_memory(tmp_path):
    """The benchmark's own measurement, at a width that runs in seconds: a float16 checkpoint loaded in bfloat16
    (the 2b release's T5, on a GPU) puts a whole converted copy in private host memory when loaded to the CPU and
    then moved, and none when loaded onto the device."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(BENCH), "--d-model", "2048", "--d-ff", "5120", "--vocab", "4096",
                           "--layers", "1", "2", "--file-dtypes", "float16", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "private peak MiB" in done.stdout  # the readable table
    result = json.loads(out.read_text())
    assert result["counted"]["t5_bf16_bytes"] == pytest.approx(9.52e9, rel=0.01)  # T5-XXL's encoder
    rows = {(r["layers"], r["path"]): r for r in result["rows"]}
    for layers in (1, 2):
        host_first, on_device = rows[layers, "host_first"], rows[layers, "on_device"]
        assert host_first["anon_peak_mb"] > 0.8 * host_first["weights_mb"]  # the copy the old path made
        assert on_device["anon_peak_mb"] < 0.2 * on_device["weights_mb"]
    per_rank = result["t5_xxl_per_rank_mb"]["float16"]
    assert per_rank["on_device"] < 0.2 * per_rank["host_first"]
