"""What cogprep and cogtrain print: no decoder or FFmpeg lines for a bad file (its reason in cogtune's words, in
the summary and report.json), no bitsandbytes warning unless 8-bit Adam is asked for, and summaries that stay
whole lines in a log file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from cogtune.preprocess import cli as prep_cli
from cogtune.preprocess.cli import app
from cogtune.shared import store as S
from cogtune.shared.cli import LOG_WIDTH, wide_console
from prep_helpers import add_clip, cogprep, moved_store, read_lines, report, write_lines
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
    [summary] = [line for line in result.output.splitlines() if line.startswith("cogprep: skipped ")]
    counts = {kind: list(expected.values()).count(kind) for kind in set(expected.values())}
    assert summary.startswith(f"cogprep: skipped {len(expected)}: ")
    for kind, n in counts.items():
        assert f"{kind} {n}" in summary
    assert summary.endswith(f"(details in {store / S.REPORT})")
    [encoded] = [line for line in result.output.splitlines() if line.startswith("cogprep: encoded ")]
    assert encoded.endswith(" s") and "on disk" in encoded


def test_console_is_wide_when_stdout_is_no_terminal(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    assert wide_console().width == LOG_WIDTH  # pytest's stdout is a capture, not a terminal
    monkeypatch.setenv("COLUMNS", "132")
    assert wide_console().width == 132


def _with_a_missing_clip(demo_txt: Path, root: Path) -> Path:
    """The demo dataset with one more entry, whose video is missing: a bad item every encode skips."""
    data = shutil.copytree(demo_txt, root / "data")
    write_lines(data / "videos.txt", read_lines(data / "videos.txt") + ["videos/missing.mp4"])
    write_lines(data / "prompts.txt", read_lines(data / "prompts.txt") + ["a clip that is not there"])
    return data


@pytest.mark.slow
def test_encode_quiet_says_nothing_but_errors_and_verbose_names_each_skipped_item(demo_txt, tiny_models, tmp_path):
    """--quiet: no bar (progress left on), table or summary line, in a process of its own as a user runs it (the
    libraries' bars read their switch on import); its errors still say why. --verbose: the plan, and each skipped
    item with its reason, which the default leaves to report.json."""
    data, store = _with_a_missing_clip(demo_txt, tmp_path), tmp_path / "store"
    args = ["encode", str(data), "--model", str(tiny_models["5b"]), "--out", str(store), "--buckets",
            str(TINY_BUCKETS), "--workers", "0"]
    quiet = subprocess.run([str(Path(sys.executable).with_name("cogprep")), *args, "--quiet"], capture_output=True,
                           text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert (quiet.stdout, quiet.stderr) == ("", "")
    assert report(store)["encoded"]["videos"] == 5 and len(report(store)["skipped"]) == 1

    default = CliRunner().invoke(app, [*args, "--no-progress"])
    assert default.exit_code == 0 and default.stderr == "", default.output
    assert "cogprep: skipped 1: missing file 1 (details in" in default.stdout and "bucket" in default.stdout
    assert "skipped item" not in default.stdout and "to encode" not in default.stdout
    verbose = CliRunner().invoke(app, [*args, "--no-progress", "--verbose"])
    assert verbose.exit_code == 0, verbose.output
    lines = verbose.stdout.splitlines()
    # a re-run of a current store: answered by columns, which the line says
    assert "cogprep: to encode: 0 clips and 0 captions, split over 1 process; bad items 1 (current by columns)" in lines
    [item] = [line for line in lines if line.startswith("cogprep: skipped item: ")]
    assert item.endswith(report(store)["skipped"][0]["reason"]) and "missing.mp4" in item
    def untimed(lines: list[str]) -> list[str]:
        return [re.sub(r"; [\d.]+ s$", "", line) for line in lines if "to encode" not in line and "item:" not in line]

    assert untimed(lines) == untimed(default.stdout.splitlines())  # the rest as the default says it

    (tmp_path / "a-file").write_text("")
    refused = CliRunner().invoke(app, [*args[:5], str(tmp_path / "a-file"), *args[6:], "--quiet"])
    assert refused.exit_code == 2 and refused.stdout == ""
    assert refused.stderr == (f"error: {tmp_path / 'a-file'}: a file, not a folder: --out takes the store folder to "
                              "create or update\n")


def test_status_verify_gc_and_inspect_quiet_keep_their_verdict_and_verbose_lists_more(demo_store, demo_txt,
                                                                                       tiny_models, tmp_path,
                                                                                       monkeypatch):
    """status --quiet: the verdict alone; its sources listed up to STATUS_LISTED, all with --verbose. verify and
    gc --quiet: nothing for a sound store (gc --dry-run still prints its plan). inspect --quiet: its tables."""
    data = shutil.copytree(demo_txt, tmp_path / "data")
    store = moved_store(demo_store, data, tiny_models["5b"], tmp_path / "store")
    videos = read_lines(data / "videos.txt")
    write_lines(data / "videos.txt", videos[2:])
    write_lines(data / "prompts.txt", read_lines(data / "prompts.txt")[2:])
    monkeypatch.setattr(prep_cli, "STATUS_LISTED", 1)
    said = {flag: cogprep("status", data, "--store", store, *flag, expect=1).stdout.splitlines()
            for flag in ((), ("--quiet",), ("--verbose",))}
    assert said[("--quiet",)] == ["store is stale: run cogprep encode"]
    assert said[()] == ["cogprep: new 0 changed 0 removed 2 unchanged 3; to encode: 0 clips, 0 captions; "
                        "bad items 0", f"cogprep: removed: {videos[0]}", "store is stale: run cogprep encode"]
    assert said[("--verbose",)] == [*said[()][:2], f"cogprep: removed: {videos[1]}", said[()][2]]

    verified = cogprep("verify", store, "--no-progress").stdout
    assert verified.startswith(f"cogprep: {store}: checked ") and verified.endswith("; 0 damaged samples\n")
    assert cogprep("verify", store, "--quiet").output == ""  # no bar either: progress is on by default
    assert cogprep("gc", store, "--quiet").output == ""
    dry = cogprep("gc", store, "--dry-run", "--quiet").stdout
    assert dry.startswith(f"{store}: nothing to reclaim") and "would reclaim about" in dry
    verbose_dry = cogprep("gc", store, "--dry-run", "--verbose").stdout
    assert verbose_dry.count("cogprep: would keep shards/") == len(list((store / S.SHARDS).rglob("*.tar")))
    tables = cogprep("inspect", store, "--quiet").stdout
    assert all(bucket["name"] in tables for bucket in S.Manifest.load(store).buckets)


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

