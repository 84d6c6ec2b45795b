"""Replacing a file so that readers see the old content or the new one, never a mix.

Used for every file an operator or the daemon relies on after a crash (the label store, a
domain config edited by `shypectl addlabel`): write a temporary file in the same folder, fsync
it, rename it over the target, fsync the folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    dirfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def write_atomic(
    path: Path, data: bytes, *, mode: int = 0o640, owner: tuple[int, int] | None = None
) -> None:
    """Replace `path` with `data` (file mode `mode`, and `owner` uid/gid when given).

    Mode and owner are set on the open descriptor, never by name: in a folder another user
    can write, the temporary name may be swapped for a symlink before we get to it, and a
    `chown` by name would then hand the link's target to that user.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
