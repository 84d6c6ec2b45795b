"""Subordinate uids (``/etc/subuid``) as the user they belong to.

A user with a subordinate range (Debian's useradd gives each user 65,536) and ``newuidmap``
(package ``uidmap``) can map the range into a user namespace and connect to the control socket
as any of those uids: the kernel reports the subordinate uid (``SO_PEERCRED``), and the user's
own groups go with it. What counts per uid (the attestation quote's rate limit) counts such a
uid as its owner's (`owner_of`), so one user is one key however many uids it holds.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Final

SUBUID: Final = Path("/etc/subuid")
#: A larger table is not read (fail closed: see `owner_of`).
MAX_TABLE_BYTES: Final = 1 << 20

#: (path, st_ino, st_mtime_ns, st_size) -> [(first, count, owner as written)]
_cache: dict[tuple[str, int, int, int], list[tuple[int, int, str]]] = {}


def _owner_key(owner: str, first: int) -> int:
    if owner.isdigit():
        return int(owner)
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        return -first  # an owner not known: the whole range as one key


def _ranges(table: Path) -> list[tuple[int, int, str]] | None:
    """The table's ranges, None when it cannot be read or is too large."""
    try:
        with table.open("rb") as f:
            st = os.fstat(f.fileno())
            key = (str(table), st.st_ino, st.st_mtime_ns, st.st_size)
            if key in _cache:
                return _cache[key]
            if st.st_size > MAX_TABLE_BYTES:
                return None
            text = f.read(MAX_TABLE_BYTES + 1).decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    except OSError:
        return None
    ranges: list[tuple[int, int, str]] = []
    for line in text.splitlines():
        owner, _, rest = line.strip().partition(":")
        first, _, count = rest.partition(":")
        if owner and not owner.startswith("#") and first.isdigit() and count.isdigit():
            ranges.append((int(first), int(count), owner))
    _cache.clear()
    _cache[key] = ranges
    return ranges


def owner_of(uid: int, table: Path = SUBUID) -> int:
    """The key `uid` counts as: the owner of the subordinate range holding it (a uid, or minus
    the range's first uid when the owner is not a known user), else `uid` itself. A table that
    exists but cannot be read or is too large: every uid above 65,535 (where ranges live)
    counts as one key, -65536 (fail closed: shared, never more)."""
    if uid < 0:
        return uid
    ranges = _ranges(table)
    if ranges is None:
        return uid if uid < 65536 else -65536
    for first, count, owner in ranges:
        if first <= uid < first + count:  # the owner looked up only here: most uids own none
            return _owner_key(owner, first)
    return uid
