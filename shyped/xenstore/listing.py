"""Directory listings of any length: DIRECTORY, and DIRECTORY_PART where xenstored refuses.

Xen's C ``xenstored`` (``tools/xenstore/xenstored_core.c``, 4.17) answers a DIRECTORY whose
child list is longer than ``XENSTORE_PAYLOAD_MAX`` (4,096 bytes) with the error ``E2BIG``: on
a host of a few hundred domains ``/local/domain`` is such a list, and so is any directory a
guest fills below its own home (it owns the nodes it creates, up to its node quota). A client
then asks for the list in parts (``XS_DIRECTORY_PART``, ``docs/misc/xenstore.txt``):

* request: ``path NUL offset NUL``, ``offset`` the byte offset (decimal) into the child list
  (every name NUL-terminated, in xenstored's order);
* reply: ``generation NUL`` then as many whole names as fit, each NUL-terminated; the part
  that reaches the end of the list carries one more NUL (an empty name). An offset past the
  end gives the generation and that empty name alone;
* the generation is the node's modification count: parts with the same generation are of
  the same list. When it changes between parts, the listing starts again from offset 0.
  Inside a transaction C xenstored keeps the node as the transaction first read it, so the
  daemon's walks (all in transactions) never start again: a writer meanwhile makes their
  commit conflict instead, and the walk is retried (`shyped.xenstore.snapshot`).

Debian's default ``oxenstored`` 4.17 answers every DIRECTORY of a dom0 socket client whole,
however long, and answers DIRECTORY_PART with ``ENOSYS`` (tests/test_xenstore_listing.py
checks both daemons).

`PartListing` is the sans-I/O assembler (offsets, the generation check, bounded restarts and
bytes); `directory` (blocking, for worker threads) and `directory_deferred` (the reactor) are
its drivers over any request function. Past a bound the listing fails with a clear
`ListingError`: never a partial list (a reconcile would decide on a tree with nodes missing).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

import attrs
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from shyped.xenstore import wire
from shyped.xenstore.errors import XenstoreError
from shyped.xenstore.wire import Op

#: ``XS_DIRECTORY_PART`` (``xen/include/public/io/xs_wire.h``: ``XS_RESET_WATCHES`` is
#: ``XS_SET_TARGET + 2``, then ``XS_DIRECTORY_PART``).
DIRECTORY_PART: Final = 22
#: Times a listing starts again because its node changed between parts, before it fails:
#: a guest rewriting its own directory without pause must not hold a walk forever
#: (libxenstore's ``xs_directory_part`` starts again without bound).
MAX_RESTARTS: Final = 8
#: Bytes of child names one listing may reach: the bound a whole DIRECTORY reply has
#: (`wire.REPLY_MAX`), so a listing in parts costs no more memory than one in one piece.
MAX_LISTING_BYTES: Final = wire.REPLY_MAX

_GENERATION = re.compile(rb"[0-9]{1,20}")
_NAME = re.compile(rb"[A-Za-z0-9\-_@]+")


class ListingError(XenstoreError):
    """A directory that could not be listed whole; ``errno_name`` is ``E2BIG``."""

    def __init__(self, path: str | None, detail: str) -> None:
        super().__init__("E2BIG", path=path, detail=detail)


def part_request(path: bytes, offset: int) -> bytes:
    """DIRECTORY_PART's payload: the path, then the byte offset in decimal."""
    if offset < 0:
        raise wire.WireError(f"negative DIRECTORY_PART offset {offset}")
    return path + wire.NUL + str(offset).encode("ascii") + wire.NUL


@attrs.frozen
class Part:
    """One DIRECTORY_PART reply: the node's generation, the names it carries, how many bytes
    of the child list they cover (names and their NULs), and whether the list ends here."""

    generation: bytes
    names: tuple[str, ...]
    size: int
    last: bool


def parse_part(payload: bytes) -> Part:
    """A DIRECTORY_PART reply, checked: WireError for anything xenstored would not send."""
    gen_end = payload.find(wire.NUL)
    if gen_end < 0:
        raise wire.WireError(f"DIRECTORY_PART reply without a generation: {payload[:64]!r}")
    generation, rest = payload[:gen_end], payload[gen_end + 1 :]
    if _GENERATION.fullmatch(generation) is None:
        raise wire.WireError(f"malformed DIRECTORY_PART generation {generation[:32]!r}")
    if not rest.endswith(wire.NUL):
        raise wire.WireError(f"DIRECTORY_PART reply not NUL-terminated: {payload[-64:]!r}")
    last = rest.endswith(wire.NUL + wire.NUL) or rest == wire.NUL
    body = rest[:-1] if last else rest  # names, each NUL-terminated
    raw = body[:-1].split(wire.NUL) if body else []
    for name in raw:
        if _NAME.fullmatch(name) is None:
            raise wire.WireError(f"malformed child name {name[:64]!r} in DIRECTORY_PART")
    if not raw and not last:
        raise wire.WireError("empty DIRECTORY_PART before the end of the list")
    return Part(generation, tuple(n.decode("ascii") for n in raw), len(body), last)


class PartListing:
    """The child list of one node, assembled from DIRECTORY_PART replies (no I/O).

    Ask for the part at `offset` and `feed` the parsed reply, until `done`; then `children`.
    A part of another generation than the first starts the list again (offset 0); more than
    ``max_restarts`` of those, or a list past ``max_bytes``, raise `ListingError`.
    """

    def __init__(
        self, path: str, *, max_restarts: int = MAX_RESTARTS, max_bytes: int = MAX_LISTING_BYTES
    ) -> None:
        self.path = path
        self.max_restarts = max_restarts
        self.max_bytes = max_bytes
        self.restarts = 0
        self.offset = 0
        self.done = False
        self._generation: bytes | None = None
        self._names: list[str] = []

    def feed(self, part: Part) -> None:
        if self.done:
            raise RuntimeError(f"listing of {self.path} already complete")
        if self._generation is None:
            self._generation = part.generation
        elif part.generation != self._generation:
            self.restarts += 1
            if self.restarts > self.max_restarts:
                raise ListingError(
                    self.path,
                    f"the directory changed during its listing in parts {self.restarts} "
                    "times running; not listed",
                )
            self.offset, self._generation, self._names = 0, None, []
            return
        elif part.last and not part.names and self.offset > 0 and part.size == 0:
            # same generation, offset past the end: not a list xenstored could have sent
            raise wire.WireError(f"DIRECTORY_PART of {self.path} ended past its list")
        self._names.extend(part.names)
        self.offset += part.size
        if self.offset > self.max_bytes:
            raise ListingError(
                self.path, f"child list longer than {self.max_bytes} bytes; not listed"
            )
        self.done = part.last

    def children(self) -> tuple[str, ...]:
        if not self.done:
            raise RuntimeError(f"listing of {self.path} not complete")
        return tuple(self._names)


def is_too_big(error: BaseException | None) -> bool:
    """The error xenstored answers a DIRECTORY longer than a message with."""
    return isinstance(error, XenstoreError) and error.errno_name == "E2BIG"


def _unsupported(path: str) -> ListingError:
    return ListingError(
        path,
        "xenstored refused the listing as too long (E2BIG) and does not answer "
        "DIRECTORY_PART (ENOSYS)",
    )


def _parse(payload: bytes, path: str) -> Part:
    try:
        return parse_part(payload)
    except wire.WireError as exc:
        raise XenstoreError("EPROTO", path, str(exc)) from None


#: A blocking request: (op, payload) -> the reply payload; raises XenstoreError.
Call = Callable[[int, bytes], bytes]
#: A request on the reactor: (op, payload) -> Deferred of the reply payload.
Request = Callable[[int, bytes], "Deferred[bytes]"]


def _failed(error: XenstoreError, path: str) -> XenstoreError:
    """What a failed DIRECTORY_PART means to the caller."""
    return _unsupported(path) if error.errno_name == "ENOSYS" else error


def read_parts(call: Call, path: str, raw_path: bytes) -> tuple[str, ...]:
    """The child list of `path` through DIRECTORY_PART alone (blocking)."""
    listing = PartListing(path)
    while not listing.done:
        try:
            payload = call(DIRECTORY_PART, part_request(raw_path, listing.offset))
        except XenstoreError as exc:
            raise _failed(exc, path) from None
        listing.feed(_parse(payload, path))
    return listing.children()


def directory(call: Call, path: str, raw_path: bytes) -> tuple[str, ...]:
    """DIRECTORY, falling back to `read_parts` when xenstored answers E2BIG (blocking)."""
    try:
        payload = call(Op.DIRECTORY, wire.path_payload(raw_path))
    except XenstoreError as exc:
        if not is_too_big(exc):
            raise
        return read_parts(call, path, raw_path)
    try:
        return wire.children(payload)
    except wire.WireError as exc:
        raise XenstoreError("EPROTO", path, str(exc)) from None


async def _read_parts_async(request: Request, path: str, raw_path: bytes) -> tuple[str, ...]:
    """`read_parts` on the reactor."""
    listing = PartListing(path)
    while not listing.done:
        try:
            payload = await request(DIRECTORY_PART, part_request(raw_path, listing.offset))
        except XenstoreError as exc:
            raise _failed(exc, path) from None
        listing.feed(_parse(payload, path))
    return listing.children()


def directory_deferred(
    first: Deferred[tuple[str, ...]], request: Request, path: str
) -> Deferred[tuple[str, ...]]:
    """`first` (a DIRECTORY request for `path`, already checked), falling back to
    DIRECTORY_PART parts on E2BIG."""

    def too_big(failure: Failure) -> Failure | Deferred[tuple[str, ...]]:
        if not is_too_big(failure.value):
            return failure
        return Deferred.fromCoroutine(_read_parts_async(request, path, path.encode("ascii")))

    first.addErrback(too_big)
    return first
