"""Strict parsing of xenstore paths, values and permissions (pure, no I/O).

Everything a guest writes is hostile, so these helpers accept only the canonical forms the Xen
tools produce and return ``None`` for anything else instead of raising: the caller turns that
into a counted `Garbage` event. Python's own conversions are too lenient for this (``int()``
accepts ``" 5"``, ``"+5"``, ``"1_000"`` and non-ASCII digits such as ``"٣"``), so integers are
checked as ASCII digit strings of bounded length before conversion.

Limits come from the xenstore wire protocol (``xen/include/public/io/xs_wire.h``):
``XENSTORE_PAYLOAD_MAX`` 4096 and ``XENSTORE_ABS_PATH_MAX`` 3072; node names use the
characters C xenstored accepts (``tools/xenstored/core.c`` ``is_valid_nodename``: ASCII letters
and digits plus ``-/_@``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final, Protocol

import attrs

#: XENSTORE_ABS_PATH_MAX: the longest absolute path xenstored accepts.
MAX_PATH: Final = 3072
#: XENSTORE_PAYLOAD_MAX: no node value can be longer.
MAX_VALUE: Final = 4096
#: Domain names are written by the toolstack; longer ones are refused as garbage.
MAX_NAME: Final = 256
#: DOMID_FIRST_RESERVED (0x7FF0): ids from here on are DOMID_SELF, DOMID_IO … never real domains.
DOMID_LIMIT: Final = 0x7FF0
#: grant_ref_t and evtchn_port_t are uint32_t.
U32_MAX: Final = 0xFFFFFFFF
#: The most entries a node's permission list may have before we stop reading it.
MAX_PERMS: Final = 64

#: Allowed characters only; empty components ("//", a trailing "/") are checked separately
#: because a flat character class is several times faster than a nested pattern.
_PATH_RE: Final = re.compile(r"/[A-Za-z0-9_@/-]*")
_UUID_RE: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

#: The two special watch paths xenstored fires itself.
SPECIAL_PATHS: Final = frozenset({"@introduceDomain", "@releaseDomain"})


def parse_path(raw: str | bytes) -> str | None:
    """Return `raw` as an absolute xenstore path, or None if it is not a valid one.

    Special watch paths (``@introduceDomain``, ``@releaseDomain``) are returned as they are.
    """
    if isinstance(raw, bytes):
        if len(raw) > MAX_PATH or not raw.isascii():
            return None
        raw = raw.decode("ascii")
    elif len(raw) > MAX_PATH:
        return None
    if raw in SPECIAL_PATHS:
        return raw
    if _PATH_RE.fullmatch(raw) is None or "//" in raw or (raw[-1] == "/" and len(raw) > 1):
        return None
    return raw


def parse_uint(raw: bytes, max_value: int) -> int | None:
    """Parse a canonical non-negative decimal integer no greater than `max_value`.

    Only ASCII digits, no sign, no spaces, no underscores, no leading zeros (other than "0").
    """
    n = len(raw)
    if n == 0 or n > 10 or not raw.isdigit() or (n > 1 and raw[0] == 0x30):
        # bytes.isdigit() only accepts ASCII 0-9
        return None
    value = int(raw)
    return value if value <= max_value else None


def parse_uint_component(text: str, max_value: int) -> int | None:
    """Parse a path component as a canonical decimal integer (see `parse_uint`)."""
    n = len(text)
    if n == 0 or n > 10 or not text.isascii() or not text.isdigit() or (n > 1 and text[0] == "0"):
        return None
    value = int(text)
    return value if value <= max_value else None


#: Canonical domid strings seen so far (at most DOMID_LIMIT entries: only valid ids go in).
_DOMIDS: dict[str, int] = {}


def parse_domid_component(text: str) -> int | None:
    """Parse a domain id as it appears in a path (``/local/domain/<domid>``)."""
    domid = _DOMIDS.get(text)
    if domid is None:
        domid = parse_uint_component(text, DOMID_LIMIT - 1)
        if domid is not None:
            _DOMIDS[text] = domid
    return domid


def parse_domid(raw: bytes) -> int | None:
    """Parse a domain id value (``backend-id``, ``frontend-id``)."""
    return parse_uint(raw, DOMID_LIMIT - 1)


def parse_text(raw: bytes, max_len: int) -> str | None:
    """Decode a printable UTF-8 value of at most `max_len` bytes, else None."""
    if len(raw) > max_len:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


def parse_abs_path_value(raw: bytes) -> str | None:
    """Parse a value that must itself be an absolute xenstore path (e.g. a ``frontend`` key)."""
    if len(raw) > MAX_PATH or not raw.isascii():
        return None
    text = raw.decode("ascii")
    if _PATH_RE.fullmatch(text) is None or "//" in text or text[-1] == "/":
        return None
    return text


def is_uuid(text: str) -> bool:
    """True for a lower-case 8-4-4-4-12 hex UUID as libxl prints it (``LIBXL_UUID_FMT``)."""
    return len(text) == 36 and _UUID_RE.fullmatch(text) is not None


#: Permission letters (``tools/libs/store/xs.c`` ``xs_strings_to_perms``): none, read, write, both.
_PERM_LETTERS: Final = frozenset("nrwb")


@attrs.frozen(slots=True)
class Perms:
    """A node's permission list: owner with the default for unlisted domains, then the ACL.

    In xenstore the first entry names the owner (who has full access) and the access every
    domain not listed gets; the following entries grant access to single domains.
    """

    owner: int
    default: str
    acl: tuple[tuple[int, str], ...]

    @property
    def world_readable(self) -> bool:
        """Every domain not in the ACL may read the node."""
        return self.default in ("r", "b")

    def readers(self) -> frozenset[int]:
        """Domains named as able to read: the owner and ACL entries with r or b."""
        return frozenset([self.owner, *(d for d, p in self.acl if p in ("r", "b"))])


class PermLike(Protocol):
    """A parsed permission entry as the gateway yields it (``shyped.xenstore.Perm``)."""

    @property
    def access(self) -> str: ...

    @property
    def domid(self) -> int: ...


#: What `parse_perms` accepts per entry: ``b"r1"``, ``"r1"`` or a parsed entry.
PermInput = bytes | str | PermLike


def _perm_entry(item: PermInput) -> tuple[int, str] | None:
    if not isinstance(item, (bytes, str)):
        access, pdomid = item.access, item.domid
        if access not in _PERM_LETTERS or not isinstance(pdomid, int):
            return None
        return (pdomid, access) if 0 <= pdomid < DOMID_LIMIT else None
    if isinstance(item, str):
        if not item.isascii():
            return None
        item = item.encode("ascii")
    if len(item) < 2 or len(item) > 6:
        return None
    letter = chr(item[0])
    if letter not in _PERM_LETTERS:
        return None
    domid = parse_domid(item[1:])
    if domid is None:
        return None
    return domid, letter


def parse_perms(raw: Sequence[PermInput]) -> Perms | None:
    """Parse a permission list as ``get_perms`` returns it (e.g. ``[b"n0", b"r1"]``).

    An empty trailing entry (what splitting the NUL-terminated wire payload leaves) is ignored.
    Returns None for anything malformed or longer than `MAX_PERMS` entries.
    """
    items = list(raw[: MAX_PERMS + 2])
    if items and items[-1] in (b"", ""):
        items.pop()
    if not items or len(items) > MAX_PERMS:
        return None
    entries = []
    for item in items:
        entry = _perm_entry(item)
        if entry is None:
            return None
        entries.append(entry)
    owner, default = entries[0]
    return Perms(owner=owner, default=default, acl=tuple(entries[1:]))
