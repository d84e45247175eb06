"""cogprep's command line: encode's options made from the dataclasses that take them and checked while click
parses; one line and exit 2 for a file given where a folder is wanted and the reverse; help that reads whole at
80 columns through a pipe."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
from dataclasses import fields

import pytest
import typer
from cogtune.preprocess.cli import app
from cogtune.preprocess.encode import RunOptions
from cogtune.preprocess.frames import FrameSampling
from cogtune.preprocess.options import SAMPLING_SET_ELSEWHERE, SETTINGS_SET_ELSEWHERE, EncodeInputs
from cogtune.preprocess.plan import EncodeSettings
from cogtune.shared import store as S
from cogtune.shared.options import field_default, field_help
from typer.testing import CliRunner

COMMANDS = typer.main.get_command(app).commands


def _invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_every_encode_option_is_a_dataclass_field_with_its_default_and_docstring():
    options = {p.name: p for p in COMMANDS["encode"].params if p.param_type_name == "option"}
    expected = {}
    for cls, set_elsewhere in ((EncodeInputs, ()), (FrameSampling, SAMPLING_SET_ELSEWHERE),
                               (EncodeSettings, SETTINGS_SET_ELSEWHERE), (RunOptions, ())):
        docs = field_help(cls)
        expected |= {f.name: (field_default(f), docs[f.name]) for f in fields(cls) if f.name not in set_elsewhere}
    assert set(options) == set(expected) | {"quiet", "verbose", "config"}
    for name, (default, help_text) in expected.items():
        assert options[name].help == help_text, name
        if default is ...:
            assert options[name].required, name
        else:
            assert options[name].default == default, name


def test_encode_and_gc_write_shards_of_one_size():
    """The encode's options and the shard writer gc uses take their sizes from one place."""
    writer = inspect.signature(S.ShardWriter).parameters
    assert RunOptions().shard_max_items == writer["max_items"].default == S.SHARD_MAX_ITEMS
    assert RunOptions().shard_max_bytes == writer["max_bytes"].default == S.SHARD_MAX_BYTES


@pytest.mark.parametrize("option, value", [("--resize", "squash"), ("--dtype", "float8"), ("--layout", "xml"),
                                           ("--compute-dtype", "int8"), ("--shard-max-items", "0"),
                                           ("--stride", "0"), ("--workers", "-1"), ("--skip-end", "-1")])
def test_a_bad_choice_or_range_is_refused_while_parsing(tmp_path, option, value):
    """click refuses it (exit 2) before any model is looked for: the model named here does not exist."""
    store = tmp_path / "store"
    result = _invoke("encode", tmp_path, "--model", tmp_path / "no-model", "--out", store, option, value)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output
    assert "no-model" not in result.output and not store.exists()


def test_a_config_file_value_is_checked_as_the_option_is(tmp_path):
    config = tmp_path / "prep.yaml"
    config.write_text("resize: squash\n")
    result = _invoke("encode", tmp_path, "--model", tmp_path / "no-model", "--out", tmp_path / "store",
                     "--config", config)
    assert result.exit_code == 2 and "Invalid value for '--resize'" in result.output, result.output


@pytest.fixture
def store(tmp_path):
    """A folder that holds a store's two files: every refusal here comes before either is read."""
    folder = tmp_path / "store"
    folder.mkdir()
    (folder / S.INDEX).write_bytes(b"PAR1")
    (folder / S.STORE_JSON).write_text("{}")
    return folder


@pytest.mark.parametrize("command", [["inspect"], ["verify"], ["gc"], ["gc", "--dry-run"],
                                     ["status", "DATA", "--store"]])
def test_a_file_given_for_the_store_folder_is_one_line(store, tmp_path, command):
    index = store / S.INDEX
    before = index.read_bytes()
    result = _invoke(*[tmp_path if word == "DATA" else word for word in command], index)
    assert result.exit_code == 2
    assert _one_line(result) == (f"error: {index}: a file, not a store: give the store's folder ({store}), which "
                                 f"holds {S.STORE_JSON} and {S.INDEX}")
    assert index.read_bytes() == before


def test_a_folder_given_for_the_preview_file_is_one_line(store, tmp_path):
    result = _invoke("inspect", store, "--preview", tmp_path)
    assert result.exit_code == 2
    assert _one_line(result) == f"error: {tmp_path}: a folder: --preview takes the PNG file to write"


def test_a_folder_given_for_the_config_file_is_one_line(tmp_path):
    result = _invoke("encode", tmp_path, "--model", "m", "--out", tmp_path / "store", "--config", tmp_path)
    assert result.exit_code == 2
    assert _one_line(result) == f"error: {tmp_path}: cannot read config (Is a directory)"


def test_a_file_given_for_out_is_one_line(tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("keep me\n")
    result = _invoke("encode", tmp_path, "--model", tmp_path / "no-model", "--out", out)
    assert result.exit_code == 2
    assert _one_line(result) == f"error: {out}: a file, not a folder: --out takes the store folder to create or update"
    assert out.read_text() == "keep me\n"


@pytest.mark.parametrize("given", ["folder", "file"])
def test_a_store_in_the_datasets_own_folder_is_refused(demo_txt, tmp_path, given):
    """``cogprep encode ds --out ds``: the store's files would land among the dataset's (and the next read of
    the folder would find store.json beside prompts.txt). Refused before the model is looked for."""
    data = shutil.copytree(demo_txt, tmp_path / "data")
    before = sorted(p.name for p in data.iterdir())
    dataset = data if given == "folder" else data / "videos.txt"
    result = _invoke("encode", dataset, "--model", tmp_path / "no-model", "--out", data)
    assert result.exit_code == 2
    assert _one_line(result) == (f"error: {data}: the dataset's own folder: give --out a folder of its own for "
                                 f"the store (e.g. {data.resolve()}-store)")
    assert sorted(p.name for p in data.iterdir()) == before


def _whole(page: str) -> str:
    """A help page checked to fit 80 columns whole, its words joined by single spaces (wrapping aside)."""
    assert max(len(line) for line in page.splitlines()) <= 80, page
    assert "…" not in page, page  # rich's mark of a cut name or default
    return " ".join(page.split())


def _help(*command: str) -> str:
    """`cogprep COMMAND --help` as a pipe gets it from an 80-column terminal."""
    exe = shutil.which("cogprep")
    assert exe, "cogprep is not on PATH"
    r = subprocess.run([exe, *command, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       env={**os.environ, "COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    return _whole(r.stdout)


PAGE_END = "--- end of a help page ---"
EVERY_HELP = f"""
import sys
from cogtune.preprocess.cli import main
for name in sys.argv[1:]:
    sys.argv = ["cogprep", name, "--help"]  # what the console script sees, and the name click shows
    try:
        main()
    except SystemExit as done:
        assert done.code in (0, None), (name, done.code)
    print({PAGE_END!r}, flush=True)
"""


@pytest.fixture(scope="module")
def help_pages() -> dict[str, str]:
    """`cogprep NAME --help` of every command, through a pipe from an 80-column terminal: the console script's
    `main` called once per command in one process (one start-up for all of them, not one each)."""
    r = subprocess.run([sys.executable, "-c", EVERY_HELP, *COMMANDS], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, env={**os.environ, "COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    *pages, rest = r.stdout.split(PAGE_END + "\n")
    assert len(pages) == len(COMMANDS) and not rest, r.stdout
    return dict(zip(COMMANDS, pages))


def test_the_command_list_reads_whole_at_80_columns_through_a_pipe():
    text = _help()
    for name, command in COMMANDS.items():
        assert f"{name} {command.short_help}" in text


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_commands_help_reads_whole_at_80_columns_through_a_pipe(name, help_pages):
    text = _whole(help_pages[name])
    assert text.startswith(f"Usage: cogprep {name} ")
    for param in COMMANDS[name].params:
        if param.param_type_name == "argument":
            assert param.metavar in text
            continue
        for flag in [*param.opts, *param.secondary_opts]:
            assert flag in text, flag
        if param.is_flag and param.secondary_opts:
            shown = param.opts[0] if param.default else param.secondary_opts[0]
            assert f"default: {shown.lstrip('-')}" in text, param.name
        elif param.is_flag:  # a lone flag (--quiet) is off unless given: click shows it no default
            assert param.default is False, param.name
        elif param.default not in (None, ...):
            assert f"default: {param.default}" in text, param.name
