"""The xenstore wire protocol as pure functions: message framing, request payloads, replies.

A message is a 16-byte little-endian header ``(type, req_id, tx_id, len)`` followed by ``len``
payload bytes (``struct xsd_sockmsg``, ``xen/include/public/io/xs_wire.h``; ``docs/misc/
xenstore.txt``).  Observed on oxenstored 4.17 (tests/test_xenstore_gateway.py checks it):
a READ reply's payload is the value verbatim (no terminator added, a NUL the writer put in
is kept); WRITE's request is ``path NUL value`` with the value running to the end of the
payload; every other reply is a list of NUL-terminated strings (``OK``, a transaction id, the
children of a DIRECTORY, the permissions of a GET_PERMS, an errno name in an ERROR).

No I/O here: the gateway sends these payloads through pyxs, the benchmark through a raw socket.
"""

from __future__ import annotations

import enum
import functools
import re
import struct
from collections.abc import Iterator

import attrs

NUL = b"\x00"

#: ``struct xsd_sockmsg``: type, req_id, tx_id, len; all uint32 little-endian.
HEADER = struct.Struct("<IIII")

#: ``XENSTORE_PAYLOAD_MAX``: xenstored rejects longer request payloads.
PAYLOAD_MAX = 4096
#: Replies to a dom0 socket client are not bounded by PAYLOAD_MAX: oxenstored answers a
#: DIRECTORY whole, however long (/local/domain on a host with a few hundred domains, and any
#: directory a guest fills below its own home: up to ``quota-maxentity`` children of up to
#: ``quota-path-max`` bytes, about 1 MiB with Debian's 1,000 x 1,024 and 8 MiB with
#: XenServer's 8,192 nodes). A longer reply drops the connection, and a guest could list such
#: a directory on every reconcile (tests/test_daemon_guest_bigdir.py), so this bound is far
#: above any quota in use: keep ``quota-maxentity`` x ``quota-path-max`` below it.
REPLY_MAX = 16 << 20


class Op(enum.IntEnum):
    """``enum xsd_sockmsg_type`` (the subset a dom0 toolstack client uses, plus events)."""

    DEBUG = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19


class WireError(ValueError):
    """A message or reply that does not follow the protocol."""


@attrs.frozen
class Header:
    """A decoded message header."""

    op: int
    req_id: int
    tx_id: int
    length: int


def pack(op: int, payload: bytes, req_id: int, tx_id: int = 0) -> bytes:
    """One framed message (header + payload), ready for a single ``send``."""
    if len(payload) > PAYLOAD_MAX:
        raise WireError(f"payload of {len(payload)} bytes exceeds {PAYLOAD_MAX}")
    return HEADER.pack(op, req_id & 0xFFFFFFFF, tx_id, len(payload)) + payload


def take_frames(buf: bytearray) -> Iterator[tuple[int, int, bytes]]:
    """The complete messages at the front of `buf` as (op, req_id, payload), each removed from
    `buf` as it is yielded; a partial one stays. WireError for a length xenstored could never
    send."""
    size = HEADER.size
    while len(buf) >= size:
        op, req_id, _tx, length = HEADER.unpack_from(buf)
        if length > REPLY_MAX:
            raise WireError(f"payload length {length} exceeds {REPLY_MAX}")
        end = size + length
        if len(buf) < end:
            return
        payload = bytes(buf[size:end])
        del buf[:end]
        yield op, req_id, payload


def unpack_header(data: bytes) -> Header:
    """Decode the 16 header bytes; reject a length xenstored could never send."""
    if len(data) != HEADER.size:
        raise WireError(f"header must be {HEADER.size} bytes, got {len(data)}")
    op, req_id, tx_id, length = HEADER.unpack(data)
    if length > REPLY_MAX:
        raise WireError(f"payload length {length} exceeds {REPLY_MAX}")
    return Header(op, req_id, tx_id, length)


# -- paths -----------------------------------------------------------------------------------

#: xenstored's path alphabet (``is_valid_path`` in cxenstored, ``Store.Path`` in oxenstored).
_PATH_CHARS = re.compile(rb"[A-Za-z0-9\-/_@]+")
#: ``XENSTORE_ABS_PATH_MAX`` / ``XENSTORE_REL_PATH_MAX``.
ABS_PATH_MAX = 3072
REL_PATH_MAX = 2048
SPECIAL_WATCHES = frozenset({b"@introduceDomain", b"@releaseDomain"})


def check_path(path: bytes, *, watch: bool = False) -> bytes:
    """Refuse a path xenstored would refuse (same rules as pyxs's ``check_path``, without its
    cost on the hot path); a watch may also name ``@introduceDomain``/``@releaseDomain``."""
    if path.startswith(b"@") and watch:
        if path not in SPECIAL_WATCHES:
            raise WireError(f"unknown special watch path {path[:64]!r}")
        return path
    if (
        _PATH_CHARS.fullmatch(path) is None
        or b"//" in path
        or (len(path) > 1 and path.endswith(b"/"))
        or len(path) > (ABS_PATH_MAX if path.startswith(b"/") else REL_PATH_MAX)
    ):
        raise WireError(f"invalid xenstore path {path[:64]!r}")
    return path


# -- request payloads ------------------------------------------------------------------------


def path_payload(path: bytes) -> bytes:
    """READ, DIRECTORY, GET_PERMS, MKDIR, RM: the path, NUL-terminated."""
    return path + NUL


def write_payload(path: bytes, value: bytes) -> bytes:
    """WRITE: path NUL value (the value is not terminated and may contain anything)."""
    return path + NUL + value


def watch_payload(path: bytes, token: bytes) -> bytes:
    """WATCH / UNWATCH: path NUL token NUL."""
    return path + NUL + token + NUL


def set_perms_payload(path: bytes, perms: tuple[Perm, ...]) -> bytes:
    """SET_PERMS: path NUL then each permission NUL-terminated; the first names the owner."""
    if not perms:
        raise WireError("SET_PERMS needs at least the owner's permission")
    return path + NUL + b"".join(p.encode() + NUL for p in perms)


def transaction_end_payload(commit: bool) -> bytes:
    """TRANSACTION_END: ``T`` commits, ``F`` aborts."""
    return (b"T" if commit else b"F") + NUL


# -- replies ---------------------------------------------------------------------------------


def strings(payload: bytes) -> list[bytes]:
    """The NUL-terminated strings of a reply (DIRECTORY, GET_PERMS, ERROR…)."""
    if not payload:
        return []
    if not payload.endswith(NUL):
        raise WireError(f"reply not NUL-terminated: {payload[:64]!r}")
    return payload[:-1].split(NUL)


def ack(payload: bytes) -> None:
    """Check a reply that must be ``OK``."""
    if payload != b"OK" + NUL:
        raise WireError(f"expected OK, got {payload[:64]!r}")


def error_name(payload: bytes) -> str:
    """The errno name carried by an ERROR reply (``ENOENT``…)."""
    parts = strings(payload)
    name = parts[0] if parts else b""
    if not re.fullmatch(rb"E[A-Z0-9]{1,30}", name):
        raise WireError(f"malformed ERROR reply: {payload[:64]!r}")
    return name.decode("ascii")


def transaction_id(payload: bytes) -> int:
    """The id in a TRANSACTION_START reply."""
    parts = strings(payload)
    if len(parts) != 1 or not parts[0].isdigit():
        raise WireError(f"malformed TRANSACTION_START reply: {payload[:64]!r}")
    tx_id = int(parts[0])
    if not 0 < tx_id <= 0xFFFFFFFF:
        raise WireError(f"transaction id out of range: {tx_id}")
    return tx_id


def children(payload: bytes) -> tuple[str, ...]:
    """The child names in a DIRECTORY reply (xenstored only stores ASCII path characters)."""
    try:
        return tuple(name.decode("ascii") for name in strings(payload))
    except UnicodeDecodeError as exc:
        raise WireError(f"non-ASCII child name in {payload[:64]!r}") from exc


def watch_event(payload: bytes) -> tuple[bytes, bytes]:
    """(path, token) of a WATCH_EVENT message."""
    parts = strings(payload)
    if len(parts) < 2:
        raise WireError(f"malformed WATCH_EVENT: {payload[:64]!r}")
    return parts[0], parts[1]


# -- permissions -----------------------------------------------------------------------------

_PERM = re.compile(rb"([nrwb])([0-9]{1,10})")


@attrs.frozen
class Perm:
    """One xenstore permission entry: ``access`` is n(one), r(ead), w(rite) or b(oth).

    In a node's permission list the first entry names the owner (who may do anything) and the
    access everybody else gets by default; later entries grant per-domain access.
    """

    access: str = attrs.field(validator=attrs.validators.in_(("n", "r", "w", "b")))
    domid: int = attrs.field(validator=[attrs.validators.ge(0), attrs.validators.le(0xFFFF)])

    def encode(self) -> bytes:
        return f"{self.access}{self.domid}".encode("ascii")

    def __str__(self) -> str:
        return f"{self.access}{self.domid}"

    @classmethod
    def parse(cls, text: bytes | str) -> Perm:
        raw = text.encode("ascii") if isinstance(text, str) else text
        match = _PERM.fullmatch(raw)
        if match is None:
            raise WireError(f"malformed permission {raw[:32]!r}")
        return cls(match.group(1).decode("ascii"), int(match.group(2)))

    @property
    def can_read(self) -> bool:
        return self.access in ("r", "b")

    @property
    def can_write(self) -> bool:
        return self.access in ("w", "b")


@functools.lru_cache(maxsize=1024)
def perms(payload: bytes) -> tuple[Perm, ...]:
    """The permission list in a GET_PERMS reply (owner first).

    Memoised (bounded): a host has few distinct permission lists, and every device decision
    reads some; the result is immutable (a tuple of frozen `Perm`), a malformed one is not
    cached (the WireError is raised each time)."""
    result = tuple(Perm.parse(p) for p in strings(payload))
    if not result:
        raise WireError("empty permission list")
    return result
