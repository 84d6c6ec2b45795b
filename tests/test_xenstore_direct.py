"""The gateway's second, watch-free connection on the reactor (`shyped.xenstore.direct`),
against a real oxenstored: the same answers as the watch connection, the label write's
check-then-change semantics, and the fallback while it is down."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from shyped.sandbox.xenstored import SandboxXenstored
from shyped.xenstore import Again, Change, ConnectionLost, GatewayConfig, NoEntry, Op, Perm, wire
from shyped.xenstore import XenstoreGateway as Gateway
from shyped.xenstore.rawclient import RawClient


def _gateway(xsd: SandboxXenstored, **overrides: Any) -> Gateway:
    values: dict[str, Any] = {
        "socket_path": str(xsd.socket_path),
        "reconnect_initial": 0.02,
        "reconnect_max": 0.2,
    }
    values.update(overrides)
    return Gateway(GatewayConfig(**values))


@pytest.fixture(params=[True, False], ids=["direct", "watch-connection"])
def gateway(request: pytest.FixtureRequest, xenstored: SandboxXenstored) -> Iterator[Gateway]:
    gw = _gateway(xenstored, direct=request.param)
    pytest_twisted.blockon(gw.connect())
    assert gw.direct is request.param
    yield gw
    pytest_twisted.blockon(gw.close())


@pytest.fixture
def direct_gateway(xenstored: SandboxXenstored) -> Iterator[Gateway]:
    gw = _gateway(xenstored)
    pytest_twisted.blockon(gw.connect())
    assert gw.direct
    yield gw
    pytest_twisted.blockon(gw.close())


async def _eventually(predicate: Any, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not met")


LABEL_PERMS = (Perm("n", 0), Perm("r", 9))
CHANGES: list[Change] = [
    (Op.MKDIR, "/local/domain/9/shyped", None),
    (Op.SET_PERMS, "/local/domain/9/shyped", LABEL_PERMS),
    (Op.WRITE, "/local/domain/9/shyped/label", b"ACM:p:a"),
    (Op.SET_PERMS, "/local/domain/9/shyped/label", LABEL_PERMS),
]


@pytest_twisted.ensureDeferred
async def test_read_nodes_gives_values_and_permissions_absent_as_none(
    gateway: Gateway, xenstored: SandboxXenstored
) -> None:
    hostile = b"\x00\xff trailing NUL\x00"
    with RawClient(str(xenstored.socket_path)) as toolstack:
        toolstack.write(b"/local/domain/9/data/v", hostile)
    await gateway.set_perms("/local/domain/9/data/v", (Perm("n", 9), Perm("r", 3)))
    values, perms = await gateway.read_nodes(
        ["/local/domain/9/data/v", "/local/domain/9/gone", "/local/domain/9/data/v"],
        ["/local/domain/9/data/v", "/local/domain/9/gone"],
    )
    assert values == {"/local/domain/9/data/v": hostile, "/local/domain/9/gone": None}
    assert perms == {
        "/local/domain/9/data/v": (Perm("n", 9), Perm("r", 3)),
        "/local/domain/9/gone": None,
    }
    with pytest.raises(ValueError):
        await gateway.read_nodes(["no/t//valid"], [])


@pytest_twisted.ensureDeferred
async def test_apply_if_writes_only_while_the_domain_is_the_one_decided(
    gateway: Gateway,
) -> None:
    """The label write: a check that fails (no node, another value) leaves nothing behind,
    not even the directory the changes would have made; one that holds makes them all."""
    check = "/local/domain/9/vm"
    assert not await gateway.apply_if(check, b"/vm/u9", CHANGES)
    with pytest.raises(NoEntry):
        await gateway.read("/local/domain/9")
    await gateway.write(check, b"/vm/other")
    assert not await gateway.apply_if(check, b"/vm/u9", CHANGES)
    with pytest.raises(NoEntry):
        await gateway.read("/local/domain/9/shyped")
    await gateway.write(check, b"/vm/u9")
    assert await gateway.apply_if(check, b"/vm/u9", CHANGES)
    assert await gateway.read("/local/domain/9/shyped/label") == b"ACM:p:a"
    assert await gateway.get_perms("/local/domain/9/shyped/label") == LABEL_PERMS
    assert await gateway.apply_if(None, b"", CHANGES[2:3])


@pytest_twisted.ensureDeferred
async def test_a_change_xenstored_refuses_fails_the_write_and_leaves_nothing(
    gateway: Gateway,
) -> None:
    await gateway.write("/local/domain/9/vm", b"/vm/u9")
    bad: list[Change] = [
        (Op.WRITE, "/local/domain/9/shyped/label", b"x"),
        (Op.SET_PERMS, "/local/domain/9/shyped/nothing-here", LABEL_PERMS),
    ]
    with pytest.raises(NoEntry):
        await gateway.apply_if("/local/domain/9/vm", b"/vm/u9", bad)
    with pytest.raises(NoEntry):
        await gateway.read("/local/domain/9/shyped/label")


@pytest_twisted.ensureDeferred
async def test_calls_fall_back_to_the_watch_connection_while_the_direct_one_is_down(
    direct_gateway: Gateway,
) -> None:
    gw = direct_gateway
    direct = gw._direct
    assert direct is not None
    direct.close()  # as if xenstored had dropped only this connection
    await _eventually(lambda: not gw.direct)
    await gw.write("/local/domain/9/vm", b"/vm/u9")
    assert await gw.apply_if("/local/domain/9/vm", b"/vm/u9", CHANGES)
    values, _ = await gw.read_nodes(["/local/domain/9/shyped/label"], [])
    assert values == {"/local/domain/9/shyped/label": b"ACM:p:a"}


@pytest_twisted.ensureDeferred
async def test_calls_in_flight_when_the_direct_connection_drops_finish_on_the_watch_one(
    direct_gateway: Gateway,
) -> None:
    """Only the direct connection is lost: no reconnect and no reconcile follow, so the
    batch's reads and the label write in flight must not fail with it."""
    gw = direct_gateway
    await gw.write("/local/domain/9/vm", b"/vm/u9")
    write = gw.apply_if("/local/domain/9/vm", b"/vm/u9", CHANGES)
    read = gw.read_nodes(["/local/domain/9/vm"], ["/local/domain/9/vm"])
    direct = gw._direct
    assert direct is not None
    direct.close()
    assert await write
    values, perms = await read
    assert values == {"/local/domain/9/vm": b"/vm/u9"} and perms["/local/domain/9/vm"]
    assert await gw.read("/local/domain/9/shyped/label") == b"ACM:p:a"


@pytest_twisted.ensureDeferred
async def test_the_direct_connection_follows_the_watch_connection_across_a_restart(
    direct_gateway: Gateway, xenstored: SandboxXenstored
) -> None:
    gw = direct_gateway
    xenstored.stop()
    await _eventually(lambda: not gw.connected)
    assert not gw.direct
    with pytest.raises(ConnectionLost):
        await gw.read_nodes(["/x"], [])
    with pytest.raises(ConnectionLost):
        await gw.apply_if(None, b"", CHANGES)
    xenstored.start()
    await _eventually(lambda: gw.connected)
    assert gw.direct
    assert await gw.apply_if(None, b"", CHANGES[:1])


def _kill(gw: Gateway) -> Any:
    """Shut the direct connection's socket down under it (as xenstored dropping only that
    connection would): not through `DirectConnection.close`."""
    direct = gw._direct
    assert direct is not None and direct._proto is not None
    direct._proto._out.socket.shutdown(socket.SHUT_RDWR)
    return direct


@pytest_twisted.ensureDeferred
async def test_a_direct_connection_lost_alone_is_opened_again(direct_gateway: Gateway) -> None:
    gw = direct_gateway
    old = _kill(gw)
    await _eventually(lambda: gw._direct is not old and gw.direct)
    new = gw._direct
    assert new is not None and new.requests == 0
    values, _ = await gw.read_nodes(["/local"], [])
    assert values == {"/local": b""}
    assert new.requests == 1  # served on the new direct connection
    assert gw.reconnects == 0  # the watch connection never went


def _conflicting(direct: Any, conflicts: int) -> list[int]:
    """Make the first `conflicts` commits of `direct` fail as a conflict does: xenstored
    aborts the transaction (the END goes out as an abort: nothing is written) and the commit
    answers EAGAIN. oxenstored merges the conflicts a test could provoke from outside, so
    this is how its EAGAIN path is reached. Returns the START requests seen."""
    one = direct._one
    starts: list[int] = []
    ends: list[bool] = []

    def abort_as_eagain(_: object) -> None:
        raise Again("EAGAIN", detail="conflict (test)")

    def spying(op: int, payload: bytes, path: str | None, tx_id: int = 0) -> Any:
        if op == Op.TRANSACTION_START:
            starts.append(tx_id)
        if op == Op.TRANSACTION_END and payload == wire.transaction_end_payload(True):
            ends.append(True)
            if len(ends) <= conflicts:
                abort = wire.transaction_end_payload(False)
                return one(op, abort, path, tx_id).addCallback(abort_as_eagain)
        return one(op, payload, path, tx_id)

    direct._one = spying
    return starts


@pytest_twisted.ensureDeferred
async def test_the_label_write_retried_on_eagain_commits(direct_gateway: Gateway) -> None:
    gw = direct_gateway
    await gw.write("/local/domain/9/vm", b"/vm/u9")
    starts = _conflicting(gw._direct, 2)
    assert await gw.apply_if("/local/domain/9/vm", b"/vm/u9", CHANGES)
    assert len(starts) == 3  # two commits refused, the third made
    assert await gw.read("/local/domain/9/shyped/label") == b"ACM:p:a"
    assert await gw.get_perms("/local/domain/9/shyped/label") == LABEL_PERMS


@pytest_twisted.ensureDeferred
async def test_the_label_write_gives_up_with_again_after_its_attempts(
    xenstored: SandboxXenstored,
) -> None:
    gw = _gateway(xenstored, tx_max_attempts=3)
    await gw.connect()
    try:
        starts = _conflicting(gw._direct, 99)
        with pytest.raises(Again):
            await gw.apply_if(None, b"", CHANGES)
        assert len(starts) == 3
        with pytest.raises(NoEntry):  # every attempt was aborted: nothing written
            await gw.read("/local/domain/9/shyped")
    finally:
        await gw.close()


@pytest_twisted.ensureDeferred
async def test_a_label_write_whose_commit_reply_is_lost_runs_again_to_the_same_end(
    direct_gateway: Gateway,
) -> None:
    """The commit went through but the direct connection dropped before its reply: the write
    runs again on the watch connection (it is idempotent) and succeeds; the node holds the
    label with the label's permissions, once."""
    gw = direct_gateway
    direct = gw._direct
    assert direct is not None
    await gw.write("/local/domain/9/vm", b"/vm/u9")
    end = direct._end
    commits: list[bool] = []

    async def end_then_drop(tx_id: int, *, commit: bool) -> bool:
        ok = await end(tx_id, commit=commit)
        commits.append(commit and ok)
        if commit and ok:
            _kill(gw)
            raise ConnectionLost("dropped after the commit")
        return ok

    direct._end = end_then_drop  # type: ignore[method-assign]
    assert await gw.apply_if("/local/domain/9/vm", b"/vm/u9", CHANGES)
    assert commits == [True]  # committed once on the direct connection, then again
    assert await gw.read("/local/domain/9/shyped/label") == b"ACM:p:a"
    assert await gw.directory("/local/domain/9/shyped") == ("label",)
    assert await gw.get_perms("/local/domain/9/shyped/label") == LABEL_PERMS
    await _eventually(lambda: gw._direct is not direct and gw.direct)
