"""What cogprep and cogtrain print: no decoder or FFmpeg lines for a bad file (its reason in cogtune's words, in
the summary and report.json), no bitsandbytes warning unless 8-bit Adam is asked for, and summaries that stay
whole lines in a log file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from cogtune.preprocess.cli import app
from cogtune.shared import store as S
from cogtune.shared.cli import LOG_WIDTH, wide_console
from prep_helpers import add_clip, report, write_lines
from test_video_codecs import DECODER_NOISE, ENCODERS, FFMPEG, X264, encode, moving_pattern
from typer.testing import CliRunner

TINY_BUCKETS = Path(__file__).parents[1] / "scripts" / "tiny_buckets.yaml"
CAPTIONS = ["a red square moving up over a black background", "a green circle moving down over a black background"]


def bad_files_dataset(root: Path) -> tuple[Path, dict[str, str]]:
    """Two good clips, then one bad file of each kind a decoder meets; returns the dataset and, per bad source,
    the kind report.json must give it."""
    data = root / "data"
    (data / "videos").mkdir(parents=True)
    (data / "videos.txt").write_text("")
    (data / "prompts.txt").write_text("")
    for i, caption in enumerate(CAPTIONS):
        add_clip(data, f"clip{i}.mp4", caption, frames=10, height=32, width=32, seed=i)
    v = data / "videos"
    whole = encode(root / "whole.mp4", moving_pattern(30), "30", "libx264", *X264).read_bytes()
    (v / "truncated.mp4").write_bytes(whole[: len(whole) // 2])  # FFmpeg: "moov atom not found"
    (v / "random.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 6000, dtype=np.uint8).tobytes())
    subprocess.run([FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac",
                    str(v / "sound.mp4")], capture_output=True, check=True)
    expected = {"videos/truncated.mp4": "corrupt or truncated video", "videos/random.mp4": "corrupt or truncated video",
                "videos/sound.mp4": "no video stream", "videos/missing.mp4": "missing file"}
    if "libxavs2" in ENCODERS:  # a codec decord2's FFmpeg cannot decode
        encode(v / "avs2.ts", moving_pattern(10), "30", "libxavs2", "-pix_fmt", "yuv420p")
        expected["videos/avs2.ts"] = "unsupported video codec"
    names = list(expected)
    write_lines(data / "videos.txt", (data / "videos.txt").read_text().splitlines() + names)
    write_lines(data / "prompts.txt", (data / "prompts.txt").read_text().splitlines() + ["a blue square"] * len(names))
    return data, expected


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_files_are_reported_in_cogtunes_words_only(tiny_models, tmp_path, capfd, monkeypatch, workers):
    """cogprep encode over corrupt, truncated, audio-only and unsupported files: the process's stderr (fd 2,
    where FFmpeg and decord write) holds none of their lines, decoding in process or in a worker."""
    monkeypatch.delenv("COLUMNS", raising=False)
    data, expected = bad_files_dataset(tmp_path)
    store = tmp_path / "store"
    result = CliRunner().invoke(app, ["encode", str(data), "--model", str(tiny_models["5b"]), "--out", str(store),
                                      "--buckets", str(TINY_BUCKETS), "--workers", str(workers), "--no-progress"])
    assert result.exit_code == 0, result.output
    err = capfd.readouterr().err
    assert not DECODER_NOISE.search(err), f"decoder output reached stderr:\n{err}"
    assert not DECODER_NOISE.search(result.output)

    skipped = report(store)["skipped"]
    assert {item["source"]: item["kind"] for item in skipped} == expected
    for item in skipped:
        assert "\n" not in item["reason"] and ".cc:" not in item["reason"]
    assert "videos/avs2.ts" not in expected or any("unsupported video codec avs2" in item["reason"] for item in skipped)
    # the summary names each kind in words, on one line however long (stdout is no terminal here: a log file)
    [summary] = [line for line in result.output.splitlines() if line.startswith("skipped ")]
    counts = {kind: list(expected.values()).count(kind) for kind in set(expected.values())}
    assert summary.startswith(f"skipped {len(expected)}: ")
    for kind, n in counts.items():
        assert f"{kind} {n}" in summary
    assert summary.endswith(f"(details in {store / S.REPORT})")
    [encoded] = [line for line in result.output.splitlines() if line.startswith("encoded ")]
    assert encoded.endswith(" s") and "on disk" in encoded


def test_console_is_wide_when_stdout_is_no_terminal(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    assert wide_console().width == LOG_WIDTH  # pytest's stdout is a capture, not a terminal
    monkeypatch.setenv("COLUMNS", "132")
    assert wide_console().width == 132


BITSANDBYTES_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"

# bitsandbytes warns on import only on a CPU with AVX512-BF16 and no `kernels` package: both are made so here,
# then cogtrain run starts (and stops at the missing store) and peft is imported, as a LoRA run imports it.
COGTRAIN_THEN_PEFT = textwrap.dedent("""
    import importlib.abc, importlib.util, sys

    class ForceAvx512Bf16(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "bitsandbytes.functional":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                module.has_avx512bf16 = lambda: True

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, ForceAvx512Bf16())
    sys.modules["kernels"] = None
    from cogtune.train.cli import main

    sys.argv = ["cogtrain", "run", *sys.argv[1:]]
    try:
        main()
    except SystemExit as stop:
        assert stop.code == 2, stop.code
    import peft
""")


@pytest.mark.slow
@pytest.mark.skipif(find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_bitsandbytes_warning_only_when_8bit_adam_is_asked_for(tmp_path, optimizer):
    args = ["--store", str(tmp_path / "no-store"), "--model", str(tmp_path / "no-model"),
            "--out", str(tmp_path / "run"), "--optimizer", optimizer]
    proc = subprocess.run([sys.executable, "-c", COGTRAIN_THEN_PEFT, *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "error: " in proc.stderr  # cogtrain said why it stopped, in one line
    assert (BITSANDBYTES_WARNING in proc.stderr) == (optimizer == "adamw8bit"), proc.stderr[-3000:]

