"""What software made a store or a run: cached latents depend on library code (the VAE's and T5's modules, the
resizing, the pipelines' conventions) as well as on weights, so a store records the versions it was encoded under
and a run the versions it trained under."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("cogtune", "torch", "diffusers", "transformers")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
"""The cogtune package's folder: the repository root, in a checkout."""


def software_versions() -> dict[str, str]:
    """{package: version} of the libraries the cached tensors depend on, and the git commit of a checkout."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    commit = git_commit(PACKAGE_ROOT)
    if commit:
        found["cogtune_commit"] = commit
    return found


def git_commit(root: Path) -> str | None:
    """The commit a checkout at `root` has checked out (read from .git, no git needed), or None."""
    git = root / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head  # a detached HEAD names its commit
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None
