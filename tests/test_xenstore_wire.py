"""The pure xenstore wire encoder/decoder (shyped.xenstore.wire)."""

from __future__ import annotations

import pytest

from shyped.xenstore import wire
from shyped.xenstore.errors import Again, NoEntry, PermissionDenied, XenstoreError, from_errno_name
from shyped.xenstore.wire import Op, Perm


def test_message_framing_round_trips() -> None:
    data = wire.pack(Op.WRITE, wire.write_payload(b"/a", b"v\x00"), req_id=7, tx_id=3)
    header = wire.unpack_header(data[:16])
    assert header == wire.Header(Op.WRITE, 7, 3, len(data) - 16)
    assert data[16:] == b"/a\x00v\x00"
    assert wire.unpack_header(wire.pack(Op.READ, b"", req_id=2**32 + 5)[:16]).req_id == 5


def test_oversized_or_truncated_messages_are_refused() -> None:
    with pytest.raises(wire.WireError):
        wire.pack(Op.WRITE, b"x" * 4097, req_id=1)
    with pytest.raises(wire.WireError):
        wire.unpack_header(wire.HEADER.pack(Op.READ, 1, 0, wire.REPLY_MAX + 1))
    # A reply may exceed the request limit (a large DIRECTORY answer to dom0).
    assert wire.unpack_header(wire.HEADER.pack(Op.DIRECTORY, 1, 0, 7400)).length == 7400
    with pytest.raises(wire.WireError):
        wire.unpack_header(b"\x00" * 15)


def test_reply_decoding() -> None:
    assert wire.children(b"a\x00bb\x00") == ("a", "bb")
    assert wire.children(b"") == ()
    assert wire.transaction_id(b"42\x00") == 42
    assert wire.error_name(b"EQUOTA\x00") == "EQUOTA"
    assert wire.watch_event(b"/p\x00tok\x00") == (b"/p", b"tok")
    wire.ack(b"OK\x00")
    bad_replies = [
        (wire.ack, b"NO\x00"),
        (wire.strings, b"unterminated"),
        (wire.transaction_id, b"0\x00"),
        (wire.error_name, b"nope\x00"),
        (wire.children, b"\xff\x00"),
        (wire.watch_event, b"/p\x00"),
    ]
    for decode, payload in bad_replies:
        with pytest.raises(wire.WireError):
            decode(payload)


def test_permissions_parse_strictly() -> None:
    assert wire.perms(b"n5\x00r0\x00b7\x00") == (Perm("n", 5), Perm("r", 0), Perm("b", 7))
    assert Perm.parse("w12").encode() == b"w12" and str(Perm("b", 3)) == "b3"
    assert Perm("r", 1).can_read and not Perm("r", 1).can_write and Perm("b", 0).can_write
    for bad in (b"x1", b"r", b"r-1", b"rr1", b"r1 ", b"r99999999999"):
        with pytest.raises((wire.WireError, ValueError)):
            Perm.parse(bad)
    with pytest.raises(ValueError):
        Perm("", 1)
    with pytest.raises(wire.WireError):
        wire.perms(b"")
    assert wire.set_perms_payload(b"/a", (Perm("n", 1), Perm("r", 0))) == b"/a\x00n1\x00r0\x00"


def test_error_names_map_to_gateway_exceptions() -> None:
    assert isinstance(from_errno_name("ENOENT", "/x"), NoEntry)
    assert isinstance(from_errno_name("EACCES"), PermissionDenied)
    assert isinstance(from_errno_name("EPERM"), PermissionDenied)
    assert isinstance(from_errno_name("EAGAIN"), Again)
    other = from_errno_name("EQUOTA", "/x")
    assert type(other) is XenstoreError and other.errno is None and "EQUOTA on /x" in str(other)
    assert from_errno_name("EINVAL").errno == 22


def test_paths_are_checked_like_xenstored_does() -> None:
    for good in (b"/", b"/local/domain/0/backend/vbd/5/51712/params", b"rel/a-b_c@d"):
        assert wire.check_path(good) == good
    assert wire.check_path(b"@introduceDomain", watch=True) == b"@introduceDomain"
    too_long = b"/" + b"a" * wire.ABS_PATH_MAX
    for bad in (b"", b"/a/", b"//a", b"/a//b", b"/a b", b"/a.b", b"/\xc3\xa9", too_long):
        with pytest.raises(wire.WireError):
            wire.check_path(bad)
    with pytest.raises(wire.WireError):
        wire.check_path(b"@anythingElse", watch=True)
