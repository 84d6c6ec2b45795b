"""Reading the files the daemon and its tools trust (config, policy, label store, xl.cfg).

Every such read goes through `read_bounded`: the path must name a regular file (after symlinks:
``/dev/zero``, a FIFO or a directory is refused before a byte is read, and opening does not
block on a FIFO), and the file may hold at most `cap` bytes; one byte more is an error naming
the file and the cap. So a typo or a hostile path (``labels = "/dev/zero"``) costs one
``open`` + ``fstat``, never gigabytes of memory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

#: Caps, in bytes, per kind of file (generous: real files are a few KiB).
CONFIG_MAX_BYTES: Final = 256 * 1024
POLICY_MAX_BYTES: Final = 4 * 1024 * 1024
LABELS_MAX_BYTES: Final = 16 * 1024 * 1024
XLCFG_MAX_BYTES: Final = 1024 * 1024


class InputFileError(OSError):
    """A file that is not a regular file or is larger than its cap (an `OSError`, so callers
    that report unreadable files report these too; ``str()`` is the whole message)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "input file error"


def _size(n: int) -> str:
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)} MiB"
    if n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n} bytes"


def read_bounded(path: Path | str, cap: int, what: str) -> bytes:
    """The bytes of regular file `path`, at most `cap`; `InputFileError` if it is not a
    regular file or is larger, `OSError` if it cannot be opened or read."""
    name = os.fspath(path)
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputFileError(f"{name}: {what} must be a regular file")
        if st.st_size > cap:
            raise InputFileError(
                f"{name}: {what} is {st.st_size} bytes, more than the {_size(cap)} accepted"
            )
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(1 << 20, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:  # the file grew while we read it
                raise InputFileError(f"{name}: {what} is more than the {_size(cap)} accepted")
        return b"".join(chunks)
    finally:
        os.close(fd)
