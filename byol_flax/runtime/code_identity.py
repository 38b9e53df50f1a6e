"""Which code a run trained with: the package version and the source commit.

Every checkpoint's run record holds it (:func:`byol_flax.checkpointing.config_changes.run_record`),
so a result can be traced to the code that produced it and a resume under other code is visible
(logged, recorded in ``config_history.jsonl`` and the model card; never refused).

The commit comes from the git checkout the package is imported from (``git rev-parse HEAD``; plus
whether tracked files differ from it), else from the installed distribution's
``direct_url.json`` (``pip install git+URL@commit`` records ``vcs_info.commit_id``), else it is
unknown (None). Git being absent or failing never stops a run. Computed once per process.
"""

import functools
import importlib.metadata
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import byol_flax

DISTRIBUTION = "byol_flax"
_GIT_TIMEOUT_SECONDS = 10


def _git(directory: Path, *args: str) -> str | None:
    """``git args`` run in ``directory``: its stripped output, None if git is missing or fails."""
    try:
        result = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True,
                                timeout=_GIT_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_identity(checkout: Path) -> dict[str, Any] | None:
    """Commit and dirty flag of ``checkout`` when it is the top of a git work tree (a package
    installed into a virtualenv that happens to lie inside some repository is not that
    repository's code, so an enclosing repository does not count)."""
    top = _git(checkout, "rev-parse", "--show-toplevel")
    if top is None or os.path.realpath(top) != os.path.realpath(checkout):
        return None
    commit = _git(checkout, "rev-parse", "HEAD")
    if not commit:
        return None
    status = _git(checkout, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status),
            "source": "git checkout"}


def installed_identity(distribution: str = DISTRIBUTION) -> dict[str, Any] | None:
    """The commit pip recorded when the package was installed from a VCS URL
    (``direct_url.json``'s ``vcs_info.commit_id``); None for other installs."""
    try:
        text = importlib.metadata.distribution(distribution).read_text("direct_url.json")
        commit = json.loads(text or "{}").get("vcs_info", {}).get("commit_id")
    except (importlib.metadata.PackageNotFoundError, OSError, ValueError, AttributeError):
        return None
    return {"commit": commit, "dirty": False, "source": "pip direct_url"} if commit else None


def _version(distribution: str = DISTRIBUTION) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return byol_flax.__version__


def identify(package_dir: Path) -> dict[str, Any]:
    """The identity of the package imported from ``package_dir`` (uncached)."""
    found = git_identity(package_dir.parent) or installed_identity()
    return {"version": _version(),
            **(found or {"commit": None, "dirty": None, "source": None})}


@functools.cache
def code_identity() -> dict[str, Any]:
    """``{"version", "commit", "dirty", "source"}`` of the running byol_flax (commit None when
    unknown); computed once per process."""
    return identify(Path(byol_flax.__file__).resolve().parent)


def source_commit() -> str | None:
    """The commit a task definition should check out to run this code (None when unknown)."""
    return code_identity()["commit"]


def describe(identity: dict[str, Any] | None) -> str:
    """One phrase for logs and the model card: ``byol_flax 0.1.0 at abc123def456 (uncommitted
    changes)``; ``unknown`` when nothing was recorded."""
    if not identity:
        return "unknown"
    text = f"byol_flax {identity.get('version')}"
    commit = identity.get("commit")
    text += f" at {commit[:12]}" if commit else " (commit unknown)"
    if identity.get("dirty"):
        text += " (uncommitted changes)"
    return text


def same_code(old: dict[str, Any] | None, new: dict[str, Any] | None) -> bool:
    """Two identities name the same code as far as they can tell (version, commit, dirty)."""
    keys = ("version", "commit", "dirty")
    return all((old or {}).get(key) == (new or {}).get(key) for key in keys)
