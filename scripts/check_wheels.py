"""Check that cogtune's runtime dependencies install from wheels alone on every platform it supports.

For each dependency in pyproject.toml (torch aside: its build is chosen per accelerator), each platform and each
Python version, pip resolves the requirement as `pip download --only-binary=:all: --no-deps --platform ...
--python-version ...` would: `pip install --dry-run` with the same options chooses the same wheel from PyPI
without downloading it (PyPI serves each wheel's metadata on its own). Prints a Markdown table of the versions
found, and exits 1 when a dependency has no wheel somewhere (a user there would need a compiler, or get nothing).

    python scripts/check_wheels.py                 # needs PyPI; a minute or two
    python scripts/check_wheels.py --list          # the requirements it checks, offline
    python scripts/check_wheels.py "decord>=0.6"   # other requirements instead of pyproject.toml's
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip carries a copy
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ("3.10", "3.11", "3.12", "3.13")


def manylinux(arch: str) -> list[str]:
    """The wheel platform tags a Linux with glibc 2.28 (RHEL 8, Debian 10, Ubuntu 18.10) or newer takes: pip takes
    --platform tags literally on Linux, so every older glibc tag is listed, with the legacy names (manylinux1,
    2010, 2014 are glibc 2.5, 2.12, 2.17) that older wheels carry."""
    legacy = ["manylinux1", "manylinux2010", "manylinux2014"] if arch == "x86_64" else ["manylinux2014"]
    return [f"manylinux_2_{minor}_{arch}" for minor in range(5, 29)] + [f"{name}_{arch}" for name in legacy]


PLATFORMS = {
    "Linux x86_64": manylinux("x86_64"),
    "Linux aarch64": manylinux("aarch64"),
    "macOS arm64": ["macosx_14_0_arm64"],
}
"""Platform name: its pip --platform tags (macOS 14 takes wheels for macOS 11 to 14 and universal2 ones)."""
SKIPPED = {"torch"}
"""Dependencies left out: torch's wheel is the one for the machine's accelerator, installed first by hand."""


def runtime_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The [project] dependencies of `pyproject`, but those in SKIPPED."""
    requirements = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [r for r in requirements if _name(r) not in SKIPPED]


def _name(requirement: str) -> str:
    """The normalised project name (PEP 503) of a requirement: ``PyYAML>=6`` -> ``pyyaml``."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9._-]+)", requirement).group(1)).lower()


def resolve_wheels(requirements: list[str], platform_tags: list[str], python: str) -> dict[str, str | None]:
    """{requirement: the wheel file pip picks on that platform and Python, or None where there is none}.

    One pip run for them all; where it finds no wheel for one, one run per requirement tells which."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        platforms = [flag for tag in platform_tags for flag in ("--platform", tag)]
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
             "--only-binary=:all:", *platforms, "--python-version", python, "--implementation", "cp",
             "--disable-pip-version-check", "-qq", "--report", str(report), *requirements],
            capture_output=True, text=True,
        )
        if proc.returncode == 0:
            wheels = {_name(i["metadata"]["name"]): i["download_info"]["url"].rsplit("/", 1)[-1]
                      for i in json.loads(report.read_text())["install"]}
            return {r: wheels[_name(r)] for r in requirements}
    if "No matching distribution" not in proc.stderr and "Could not find a version" not in proc.stderr:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        raise SystemExit(f"pip failed (Python {python}, {platform_tags[-1]}): {last}")
    if len(requirements) == 1:
        return {requirements[0]: None}
    return {r: wheel for one in requirements for r, wheel in resolve_wheels([one], platform_tags, python).items()}


def check(requirements: list[str], jobs: int) -> dict[tuple[str, str, str], str | None]:
    """{(requirement, platform, python): wheel file or None}, `jobs` platform and Python pairs at a time."""
    pairs = [(p, py) for p in PLATFORMS for py in PYTHONS]
    with ThreadPoolExecutor(jobs) as pool:
        found = pool.map(lambda pair: resolve_wheels(requirements, PLATFORMS[pair[0]], pair[1]), pairs)
        return {(r, p, py): wheels[r] for (p, py), wheels in zip(pairs, found) for r in requirements}


def cell(wheels: dict[str, str | None]) -> str:
    """One platform's cell: the version found for each Python (collapsed where they agree), and any Python
    without a wheel."""
    missing = [py for py, wheel in wheels.items() if wheel is None]
    versions: dict[str, list[str]] = {}
    for py, wheel in wheels.items():
        if wheel is not None:
            versions.setdefault(wheel.split("-")[1], []).append(py)
    found = [v if len(versions) == 1 else f"{v} ({', '.join(pys)})" for v, pys in versions.items()]
    return "; ".join([*found, *(["**no wheel: " + ", ".join(missing) + "**"] if missing else [])])


def table(requirements: list[str], results: dict[tuple[str, str, str], str | None]) -> str:
    lines = [f"| dependency | {' | '.join(PLATFORMS)} |", "|---" * (len(PLATFORMS) + 1) + "|"]
    for r in requirements:
        cells = [cell({py: results[(r, p, py)] for py in PYTHONS}) for p in PLATFORMS]
        lines.append(f"| `{r}` | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("requirements", nargs="*", help="requirements to check instead of pyproject.toml's")
    parser.add_argument("--list", action="store_true", help="print the requirements checked and exit (offline)")
    parser.add_argument("--jobs", type=int, default=6, help="pip processes at once (default 6)")
    args = parser.parse_args(argv)
    requirements = args.requirements or runtime_requirements()
    if args.list:
        print("\n".join(requirements))
        return 0
    results = check(requirements, args.jobs)
    print(f"Wheels on PyPI for CPython {', '.join(PYTHONS)} (pip --only-binary=:all: --no-deps; torch aside):\n")
    print(table(requirements, results))
    missing = sorted({(r, p) for (r, p, _), wheel in results.items() if wheel is None})
    if missing:
        print("\nno wheel: " + "; ".join(f"{r} on {p}" for r, p in missing))
        return 1
    print(f"\nevery dependency has a wheel on {', '.join(PLATFORMS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
