"""The files a clean clone of this tree has (with working-tree edits): what scripts/build-deb.sh
builds the .deb from, and what tests/test_packaging.py builds the sdist from."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tree_files() -> list[str]:
    """Tracked and new files (nothing git ignores, so no .venv or egg-info), relative, sorted;
    as `git ls-files -co --exclude-standard` in build-deb.sh, without deleted ones."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted(
        name
        for name in listed.split("\0")
        if name and (ROOT / name).is_file() and not (ROOT / name).is_symlink()
    )
