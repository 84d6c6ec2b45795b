"""Directory listings longer than a message: C xenstored's E2BIG and DIRECTORY_PART.

Against both real daemons of Debian's xen-utils-4.17: Xen's C xenstored refuses a DIRECTORY
of more than 4,096 bytes (E2BIG) and answers it in parts; oxenstored, Debian's default,
answers it whole and does not know DIRECTORY_PART (ENOSYS). Before `shyped.xenstore.listing`
every listing of the gateway (its reconcile walk, ``directory``, a transaction's
``directory``) failed on such a directory under the C daemon.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytest_twisted
from cxenstored_helpers import CXENSTORED, CXenstored

from shyped.sandbox.xenstored import SandboxXenstored
from shyped.xenstore import GatewayConfig, XenstoreError, XenstoreGateway, wire
from shyped.xenstore.listing import (
    DIRECTORY_PART,
    MAX_RESTARTS,
    ListingError,
    Part,
    PartListing,
    directory,
    parse_part,
    part_request,
)
from shyped.xenstore.rawclient import RawClient

needs_cxenstored = pytest.mark.skipif(
    not CXENSTORED.exists(), reason=f"{CXENSTORED} (Debian xen-utils-4.17) not installed"
)

#: Children whose list is some 3 messages long: 300 x (27 + 1) bytes.
NAMES = [f"child-with-a-long-name-{i:04d}" for i in range(300)]


def _raw(sock: str, op: int, payload: bytes, tx_id: int = 0) -> tuple[int, bytes]:
    """One request on a fresh raw connection: (reply type, payload)."""
    with RawClient(sock) as conn:
        conn.sock.sendall(wire.HEADER.pack(op, 7, tx_id, len(payload)) + payload)
        header, reply = conn._recv_message()
        return header.op, reply


def _fill(sock: str, parent: str, names: list[str]) -> None:
    with RawClient(sock) as conn:
        for name in names:
            conn.write(f"{parent}/{name}".encode(), b"x")


# -- the part assembler (pure) --------------------------------------------------------------


def _part(gen: int, names: list[str], last: bool) -> bytes:
    body = b"".join(n.encode() + b"\0" for n in names)
    return str(gen).encode() + b"\0" + body + (b"\0" if last else b"")


def test_parts_are_parsed_as_xenstored_sends_them() -> None:
    assert part_request(b"/a", 0) == b"/a\x000\x00"
    middle = parse_part(_part(7, ["a", "bb"], last=False))
    assert middle == Part(b"7", ("a", "bb"), 5, last=False)
    end = parse_part(_part(7, ["c"], last=True))
    assert end == Part(b"7", ("c",), 2, last=True)
    assert parse_part(b"7\0\0") == Part(b"7", (), 0, last=True)  # past the end / empty


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # nothing
        b"7",  # no NUL after the generation
        b"x7\0a\0",  # not a generation
        b"7\0a",  # a name not NUL-terminated
        b"7\0",  # no name, not the end: no progress
        b"7\0a\0\0b\0",  # an empty name in the middle
        b"7\0a/b\0\0",  # a name with a slash
        b"7\0" + "é".encode() + b"\0\0",  # not ASCII
    ],
)
def test_a_malformed_part_is_refused(payload: bytes) -> None:
    with pytest.raises(wire.WireError):
        parse_part(payload)


def test_a_listing_assembles_parts_at_their_byte_offsets() -> None:
    listing = PartListing("/d")
    listing.feed(parse_part(_part(3, ["a", "bb"], last=False)))
    assert (listing.offset, listing.done) == (5, False)
    listing.feed(parse_part(_part(3, ["ccc"], last=True)))
    assert listing.done and listing.children() == ("a", "bb", "ccc")


def test_a_listing_that_changes_between_parts_starts_again() -> None:
    listing = PartListing("/d")
    listing.feed(parse_part(_part(3, ["a", "bb"], last=False)))
    listing.feed(parse_part(_part(4, ["zz"], last=True)))  # the node changed: start again
    assert (listing.offset, listing.done, listing.restarts) == (0, False, 1)
    listing.feed(parse_part(_part(4, ["a"], last=False)))
    listing.feed(parse_part(_part(4, ["zz"], last=True)))
    assert listing.children() == ("a", "zz")  # nothing of the first attempt is kept


def test_a_listing_that_never_holds_still_fails_closed() -> None:
    listing = PartListing("/d", max_restarts=3)
    gen = 0
    with pytest.raises(ListingError) as caught:
        for _ in range(10):
            listing.feed(parse_part(_part(gen, ["a"], last=False)))
            gen += 1
    assert caught.value.errno_name == "E2BIG" and "changed" in str(caught.value)
    assert listing.restarts == 4 and not listing.done


def test_a_listing_past_its_byte_bound_fails_closed() -> None:
    listing = PartListing("/d", max_bytes=10)
    listing.feed(parse_part(_part(1, ["abcd"], last=False)))
    with pytest.raises(ListingError, match="longer than 10 bytes"):
        listing.feed(parse_part(_part(1, ["efghij"], last=False)))


def test_a_part_past_the_end_of_an_unchanged_list_is_a_protocol_error() -> None:
    listing = PartListing("/d")
    listing.feed(parse_part(_part(1, ["abcd"], last=False)))
    with pytest.raises(wire.WireError):
        listing.feed(parse_part(b"1\0\0"))


# -- the blocking driver over a scripted xenstored -------------------------------------------


class Scripted:
    """Answers DIRECTORY with E2BIG and DIRECTORY_PART from `parts` (each an errno name or
    a payload), recording the offsets asked for."""

    def __init__(self, parts: Iterator[bytes | str]) -> None:
        self.parts = parts
        self.offsets: list[int] = []

    def __call__(self, op: int, payload: bytes) -> bytes:
        if op == wire.Op.DIRECTORY:
            raise XenstoreError("E2BIG", "/d")
        assert op == DIRECTORY_PART
        self.offsets.append(int(payload.split(b"\0")[1]))
        answer = next(self.parts)
        if isinstance(answer, str):
            raise XenstoreError(answer, "/d")
        return answer


def test_the_driver_reads_parts_at_the_offsets_it_was_given() -> None:
    xs = Scripted(iter([_part(1, ["a", "bb"], False), _part(1, ["c"], True)]))
    assert directory(xs, "/d", b"/d") == ("a", "bb", "c")
    assert xs.offsets == [0, 5]


def test_the_driver_gives_up_on_a_directory_rewritten_without_pause() -> None:
    xs = Scripted(_part(gen, ["a"], False) for gen in range(10_000))
    with pytest.raises(ListingError, match="changed during its listing"):
        directory(xs, "/d", b"/d")
    assert len(xs.offsets) == 2 * (MAX_RESTARTS + 1)  # bounded: each attempt is two parts


def test_the_driver_says_why_when_xenstored_has_no_parts() -> None:
    with pytest.raises(ListingError, match="does not answer DIRECTORY_PART"):
        directory(Scripted(iter(["ENOSYS"])), "/d", b"/d")
    with pytest.raises(XenstoreError) as caught:  # removed meanwhile: as for DIRECTORY
        directory(Scripted(iter(["ENOENT"])), "/d", b"/d")
    assert caught.value.errno_name == "ENOENT"
    with pytest.raises(XenstoreError, match="EPROTO"):
        directory(Scripted(iter([b"junk"])), "/d", b"/d")


# -- the real daemons -------------------------------------------------------------------------


@pytest.fixture(name="cxs")
def cxs_fixture() -> Iterator[CXenstored]:
    with CXenstored() as daemon:
        yield daemon


@pytest.fixture(name="cgateway")
def cgateway_fixture(cxs: CXenstored) -> Iterator[XenstoreGateway]:
    gw = XenstoreGateway(GatewayConfig(socket_path=str(cxs.socket_path)))
    pytest_twisted.blockon(gw.connect())
    yield gw
    pytest_twisted.blockon(gw.close())


@needs_cxenstored
def test_c_xenstored_refuses_a_long_directory_and_answers_it_in_parts(cxs: CXenstored) -> None:
    sock = str(cxs.socket_path)
    _fill(sock, "/big", NAMES)
    assert _raw(sock, 1, b"/big\0") == (16, b"E2BIG\0")
    op, first = _raw(sock, DIRECTORY_PART, part_request(b"/big", 0))
    part = parse_part(first)
    assert op == DIRECTORY_PART and len(first) <= 4096 and not part.last
    assert list(part.names) == NAMES[: len(part.names)]
    # A child added between two parts changes the generation the next part carries.
    _fill(sock, "/big", ["added-between-parts"])
    _, second = _raw(sock, DIRECTORY_PART, part_request(b"/big", part.size))
    assert parse_part(second).generation != part.generation


@needs_cxenstored
def test_in_a_transaction_the_parts_hold_still_while_the_directory_changes(
    cxs: CXenstored,
) -> None:
    # Every walk of the daemon lists in a transaction: a guest adding children meanwhile
    # cannot make it start again (the commit conflicts instead, and the walk is retried).
    sock = str(cxs.socket_path)
    _fill(sock, "/big", NAMES)
    with RawClient(sock) as walker, RawClient(sock) as guest:
        tx = wire.transaction_id(walker.request(wire.Op.TRANSACTION_START, b"\0"))
        listing = PartListing("/big")
        while not listing.done:
            reply = walker.request(DIRECTORY_PART, part_request(b"/big", listing.offset), tx)
            listing.feed(parse_part(reply))
            guest.write(b"/big/added-%d" % listing.offset, b"x")
        assert listing.restarts == 0 and listing.children() == tuple(NAMES)


def test_oxenstored_answers_a_long_directory_whole_and_knows_no_parts(
    xenstored: SandboxXenstored,
) -> None:
    sock = str(xenstored.socket_path)
    _fill(sock, "/big", NAMES)
    op, whole = _raw(sock, 1, b"/big\0")
    assert op == 1 and len(whole) > 4096 and wire.children(whole) == tuple(NAMES)
    assert _raw(sock, DIRECTORY_PART, part_request(b"/big", 0)) == (16, b"ENOSYS\0")


@needs_cxenstored
@pytest_twisted.ensureDeferred
async def test_every_gateway_listing_reads_a_long_directory_from_c_xenstored(
    cxs: CXenstored, cgateway: XenstoreGateway
) -> None:
    _fill(str(cxs.socket_path), "/big", NAMES)
    assert await cgateway.directory("/big") == tuple(NAMES)
    in_tx = await cgateway.transaction(lambda tx: tx.directory("/big"))
    assert in_tx == tuple(NAMES)
    snap = await cgateway.snapshot("/", with_perms=False)
    assert snap.nodes["/big"].children == tuple(NAMES)
    assert snap.consistent
    scan = await cgateway.scan("/", lambda p: False, lambda p: p.startswith("/big/"))
    assert all(f"/big/{n}" in scan.entries for n in NAMES)
    assert cgateway.connected


@needs_cxenstored
@pytest_twisted.ensureDeferred
async def test_a_listing_error_other_than_e2big_is_not_retried_in_parts(
    cgateway: XenstoreGateway,
) -> None:
    with pytest.raises(XenstoreError) as caught:
        await cgateway.directory("/absent/node")
    assert caught.value.errno_name == "ENOENT"
