"""Packaging: one import package `cogtune`, console scripts with --help and --version."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest


def _python(code, cwd):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)


def test_cogtune_subpackages_import_from_this_checkout(tmp_path):
    """From a neutral folder, `cogtune` is this checkout (scripts/_env.sh installs it editable, and the package-dir
    mapping makes the repository root the package), each subpackage its folder, and ``__version__`` the version
    pyproject.toml gives the installed distribution."""
    root = Path(__file__).parents[1]
    r = _python("import importlib.metadata, json, cogtune, cogtune.train, cogtune.preprocess, cogtune.shared\n"
                "modules = (cogtune, cogtune.train, cogtune.preprocess, cogtune.shared)\n"
                "print(json.dumps({'version': cogtune.__version__, 'installed': importlib.metadata.version('cogtune'),"
                " 'files': {m.__name__: m.__file__ for m in modules}}))", tmp_path)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    declared = re.search(r'^version = "(.+)"$', (root / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert found["version"] == found["installed"] == declared
    assert found["files"] == {"cogtune": str(root / "__init__.py"),
                              **{f"cogtune.{name}": str(root / name / "__init__.py")
                                 for name in ("train", "preprocess", "shared")}}


@pytest.mark.parametrize("name", ["train", "preprocess", "shared"])
def test_no_top_level_modules_installed(tmp_path, name):
    r = _python(f"import {name}", tmp_path)  # a neutral cwd: only site-packages can provide it
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr


@pytest.mark.parametrize("command", ["cogprep", "cogtrain"])
def test_console_scripts_help_and_version(command):
    exe = __import__("shutil").which(command)
    assert exe, f"{command} is not on PATH"
    r = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith(f"{command} (cogtune) ")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "Usage" in r.stdout


def test_make_tiny_model_script(tmp_path):
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "make_tiny_model.py"
    r = subprocess.run([sys.executable, str(script), "--variant", "2b", "--out", str(tmp_path / "m")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "model_index.json").exists()
    r = subprocess.run([sys.executable, str(script), "--variant", "7b", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("module", ["cogtune.preprocess.cli", "cogtune.train.cli"])
def test_every_option_of_every_command_has_help(module):
    import importlib

    import typer

    group = typer.main.get_command(importlib.import_module(module).app)
    assert group.commands
    for name, command in group.commands.items():
        assert (command.help or "").strip(), f"{name}: no help"
        options = [param for param in command.params if param.param_type_name == "option"]
        assert options, name
        for option in options:
            assert (option.help or "").strip(), f"{name} --{option.name}: no help"


def test_check_wheels_lists_the_runtime_dependencies_offline():
    """scripts/check_wheels.py asks PyPI (not in the suite); --help and --list need no network."""
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "check_wheels.py"
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--list" in r.stdout
    r = subprocess.run([sys.executable, str(script), "--list"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    listed = r.stdout.split()
    assert "decord2>=3.4" in listed and not any(line.startswith(("torch", "decord>")) for line in listed)
