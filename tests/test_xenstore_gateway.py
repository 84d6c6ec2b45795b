"""The xenstore gateway against a real oxenstored (tests/conftest.py's ``xenstored`` fixture).

Async tests run on the Twisted reactor through pytest-twisted; blocking pyxs/raw clients stand
in for other xenstore users (the toolstack, a guest).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.python import threadable

from shyped.sandbox.xenstored import SandboxXenstored
from shyped.xenstore import (
    Again,
    Change,
    ConnectionLost,
    GatewayConfig,
    NoEntry,
    Op,
    Perm,
    Transaction,
    XenstoreGateway,
)
from shyped.xenstore.rawclient import RawClient


def _config(xsd: SandboxXenstored, **overrides: Any) -> GatewayConfig:
    values: dict[str, Any] = {
        "socket_path": str(xsd.socket_path),
        "reconnect_initial": 0.02,
        "reconnect_max": 0.2,
    }
    values.update(overrides)
    return GatewayConfig(**values)


@pytest.fixture
def gateway(xenstored: SandboxXenstored) -> Iterator[XenstoreGateway]:
    gw = XenstoreGateway(_config(xenstored))
    pytest_twisted.blockon(gw.connect())
    yield gw
    pytest_twisted.blockon(gw.close())


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def eventually(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Let the reactor run until ``predicate()`` holds (no timing is asserted)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await sleep(0.01)


# -- requests ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_values_come_back_verbatim_bytes(
    gateway: XenstoreGateway, xenstored: SandboxXenstored
) -> None:
    hostile = b"\x00\xff\xfe trailing NUL\x00"
    await gateway.write("/local/domain/5/data/v", hostile)
    assert await gateway.read("/local/domain/5/data/v") == hostile
    with RawClient(str(xenstored.socket_path)) as other:  # stored exactly so
        assert other.read(b"/local/domain/5/data/v") == hostile
    await gateway.write("/local/domain/5/data/empty", b"")
    assert await gateway.read("/local/domain/5/data/empty") == b""


@pytest_twisted.ensureDeferred
async def test_missing_node_raises_noentry_and_read_many_maps_it_to_none(
    gateway: XenstoreGateway,
) -> None:
    await gateway.write("/vm/a", b"1")
    with pytest.raises(NoEntry) as err:
        await gateway.read("/vm/missing")
    assert err.value.path == "/vm/missing"
    assert err.value.errno_name == "ENOENT"
    got = await gateway.read_many(["/vm/a", "/vm/missing", "/vm"])
    assert got == {"/vm/a": b"1", "/vm/missing": None, "/vm": b""}


@pytest_twisted.ensureDeferred
async def test_directory_mkdir_rm(gateway: XenstoreGateway) -> None:
    await gateway.mkdir("/libxl/7/device/vbd/51712")
    await gateway.write("/libxl/7/device/vif/0/frontend", b"/local/domain/7/device/vif/0")
    assert await gateway.directory("/libxl/7/device") == ("vbd", "vif")
    assert await gateway.read("/libxl/7/device/vbd/51712") == b""
    await gateway.rm("/libxl/7/device")
    assert await gateway.directory("/libxl/7") == ()
    with pytest.raises(NoEntry):
        await gateway.directory("/libxl/7/device")


@pytest_twisted.ensureDeferred
async def test_directory_listing_larger_than_a_request_payload(
    gateway: XenstoreGateway,
) -> None:
    # /vm on a host with a few hundred domains: oxenstored answers a dom0 client with more
    # than XENSTORE_PAYLOAD_MAX bytes, and the connection must survive it.
    uuids = [f"6f1b1c9e-2a4d-4c55-9e0e-{n:012d}" for n in range(200)]
    await gateway.transaction(lambda tx: [tx.write(f"/vm/{u}/name", b"x") for u in uuids])
    listing = await gateway.directory("/vm")
    assert sum(len(u) + 1 for u in listing) > 4096
    assert sorted(listing) == sorted(uuids)
    assert gateway.connected
    snap = await gateway.snapshot("/vm", with_perms=False)
    assert f"/vm/{uuids[-1]}/name" in snap.nodes


@pytest_twisted.ensureDeferred
async def test_permissions_round_trip(gateway: XenstoreGateway, xs: Any) -> None:
    await gateway.write("/local/domain/7/device/vif/0/state", b"1")
    await gateway.set_perms("/local/domain/7/device/vif/0", [Perm("n", 7), Perm("r", 0)])
    assert await gateway.get_perms("/local/domain/7/device/vif/0") == (
        Perm("n", 7),
        Perm("r", 0),
    )
    # A plain pyxs client agrees on what was stored.
    assert xs.get_perms(b"/local/domain/7/device/vif/0") == [b"n7", b"r0"]


@pytest_twisted.ensureDeferred
async def test_bad_requests_are_refused_before_reaching_xenstored(
    gateway: XenstoreGateway,
) -> None:
    for bad in ("/trailing/", "/sp ace", "/dou//ble", "/é"):
        with pytest.raises(ValueError):
            await gateway.read(bad)
    with pytest.raises(TypeError):
        await gateway.write("/vm/x", "not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await gateway.set_perms("/vm/x", [])
    assert gateway.connected


# -- transactions --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_transaction_writes_are_invisible_until_commit(
    gateway: XenstoreGateway, xenstored: SandboxXenstored
) -> None:
    seen_inside: list[bool] = []

    def create(tx: Transaction) -> int:
        tx.write("/vm/u1/name", b"bank-a")
        tx.write("/vm/u1/domid", b"3")
        with RawClient(str(xenstored.socket_path)) as other:
            try:
                other.read(b"/vm/u1/name")
                seen_inside.append(True)
            except NoEntry:
                seen_inside.append(False)
        return tx.tx_id

    tx_id = await gateway.transaction(create)
    assert tx_id > 0
    assert seen_inside == [False]
    assert await gateway.read_many(["/vm/u1/name", "/vm/u1/domid"]) == {
        "/vm/u1/name": b"bank-a",
        "/vm/u1/domid": b"3",
    }


@pytest_twisted.ensureDeferred
async def test_transaction_function_error_aborts_everything(gateway: XenstoreGateway) -> None:
    class Refused(Exception):
        pass

    def half(tx: Transaction) -> None:
        tx.write("/vm/u2/name", b"x")
        raise Refused

    with pytest.raises(Refused):
        await gateway.transaction(half)
    with pytest.raises(NoEntry):
        await gateway.read("/vm/u2/name")


@pytest_twisted.ensureDeferred
async def test_apply_if_writes_only_when_the_check_holds(gateway: XenstoreGateway) -> None:
    """The label write's shape: the check and the changes pipelined in one round trip; a check
    that fails (other value, or no node) leaves nothing behind, not even a parent directory."""
    perms = (Perm("n", 0), Perm("r", 9))
    changes: list[Change] = [
        (Op.MKDIR, "/local/domain/9/shype", None),
        (Op.SET_PERMS, "/local/domain/9/shype", perms),
        (Op.WRITE, "/local/domain/9/shype/label", b"ACM:p:a"),
    ]
    check = "/local/domain/9/vm"
    assert not await gateway.transaction(lambda tx: tx.apply_if(check, b"/vm/u9", changes))
    with pytest.raises(NoEntry):
        await gateway.read("/local/domain/9")
    await gateway.write(check, b"/vm/other")
    assert not await gateway.transaction(lambda tx: tx.apply_if(check, b"/vm/u9", changes))
    with pytest.raises(NoEntry):
        await gateway.read("/local/domain/9/shype")
    await gateway.write(check, b"/vm/u9")
    assert await gateway.transaction(lambda tx: tx.apply_if(check, b"/vm/u9", changes))
    assert await gateway.read("/local/domain/9/shype/label") == b"ACM:p:a"
    assert await gateway.get_perms("/local/domain/9/shype") == perms
    assert await gateway.transaction(lambda tx: tx.apply_if(None, b"", changes[2:]))


@pytest_twisted.ensureDeferred
async def test_conflicting_transactions_of_two_gateways_retry_on_eagain(
    gateway: XenstoreGateway, xenstored: SandboxXenstored
) -> None:
    other = XenstoreGateway(_config(xenstored))
    await other.connect()
    try:
        await gateway.write("/counter", b"0")
        a_has_read = threading.Event()
        b_committed = threading.Event()
        a_calls: list[int] = []

        def increment(tx: Transaction) -> int:
            value = int(tx.read("/counter"))
            tx.write("/counter", b"%d" % (value + 1))
            return value + 1

        def increment_slowly(tx: Transaction) -> int:
            a_calls.append(tx.tx_id)
            value = int(tx.read("/counter"))
            if len(a_calls) == 1:  # first attempt: let the other gateway commit in between
                a_has_read.set()
                assert b_committed.wait(10)
            tx.write("/counter", b"%d" % (value + 1))
            return value + 1

        a = gateway.transaction(increment_slowly)
        await eventually(a_has_read.is_set)
        assert await other.transaction(increment) == 1
        b_committed.set()
        assert await a == 2  # re-ran on the committed value
        assert len(a_calls) == 2
        assert await gateway.read("/counter") == b"2"
    finally:
        await other.close()


@pytest_twisted.ensureDeferred
async def test_transaction_gives_up_with_again_after_max_attempts(
    gateway: XenstoreGateway, xenstored: SandboxXenstored
) -> None:
    await gateway.write("/hot", b"0")
    calls: list[int] = []

    def always_conflicting(tx: Transaction) -> None:
        calls.append(tx.tx_id)
        tx.write("/hot", tx.read("/hot") + b"+")
        with RawClient(str(xenstored.socket_path)) as writer:
            writer.write(b"/hot", b"%d" % len(calls))

    with pytest.raises(Again):
        await gateway.transaction(always_conflicting, max_attempts=3)
    assert len(calls) == 3
    assert await gateway.read("/hot") == b"3"  # only the outside writes landed


# -- snapshot ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_snapshot_reads_a_subtree_with_values_children_and_perms(
    gateway: XenstoreGateway,
) -> None:
    base = "/local/domain/4"
    for i in range(30):
        await gateway.write(f"{base}/device/vbd/{i}/state", b"%d" % (i % 8))
    await gateway.write(f"{base}/name", b"guest\x00")
    await gateway.set_perms(f"{base}/device", [Perm("n", 4), Perm("r", 0)])

    snap = await gateway.snapshot(base)
    assert snap.consistent and snap.root == base
    assert snap.nodes[f"{base}/name"].value == b"guest\x00"
    assert len(snap.nodes[f"{base}/device/vbd"].children) == 30
    assert snap.nodes[f"{base}/device/vbd/17/state"].value == b"1"
    assert snap.nodes[f"{base}/device"].perms == (Perm("n", 4), Perm("r", 0))
    assert len(snap.nodes) == 1 + 1 + 1 + 1 + 30 * 2  # base, name, device, vbd, i, i/state
    order = list(snap.nodes)  # parents before children
    assert all(order.index(p.rsplit("/", 1)[0]) < i for i, p in enumerate(order) if i)

    bare = await gateway.snapshot(base, with_perms=False)
    assert bare.nodes[f"{base}/device"].perms is None
    assert (await gateway.snapshot("/local/domain/99")).nodes == {}


# -- watches -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_watch_events_are_delivered_on_the_reactor_thread(
    gateway: XenstoreGateway, xs: Any
) -> None:
    events: list[tuple[str, str, bool]] = []

    def on_event(path: str, token: str) -> None:
        events.append((path, token, threadable.isInIOThread()))

    await gateway.watch("/local/domain/3", "dom3", on_event)
    xs.write(b"/local/domain/3/device/vif/0/state", b"4")
    await eventually(lambda: any(p.endswith("/state") for p, _, _ in events))
    assert events[0][:2] == ("/local/domain/3", "dom3")  # fires once on registration
    assert ("/local/domain/3/device/vif/0/state", "dom3", True) in events
    assert all(in_reactor for _, _, in_reactor in events)

    await gateway.unwatch("dom3")
    before = len(events)
    xs.write(b"/local/domain/3/device/vif/0/state", b"5")
    await gateway.read("/local/domain/3/device/vif/0/state")  # a round trip after the write
    await sleep(0.05)
    assert len(events) == before


@pytest_twisted.ensureDeferred
async def test_watch_tokens_are_unique(gateway: XenstoreGateway) -> None:
    await gateway.watch("/a", "t", lambda p, t: None)
    with pytest.raises(ValueError):
        await gateway.watch("/b", "t", lambda p, t: None)
    with pytest.raises(ValueError):
        await gateway.watch("/b", "bad token", lambda p, t: None)
    assert gateway.watched() == {"t": "/a"}


# -- connection loss -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connect_fails_fast_when_xenstored_is_absent(xenstored: SandboxXenstored) -> None:
    gw = XenstoreGateway(_config(xenstored, socket_path=str(xenstored.socket_path) + "-none"))
    with pytest.raises(ConnectionLost):
        await gw.connect()
    assert not gw.connected
    await gw.close()


@pytest_twisted.ensureDeferred
async def test_xenstored_restart_reconnects_rearms_watches_and_asks_for_reconcile(
    xenstored: SandboxXenstored,
) -> None:
    lost: list[ConnectionLost] = []
    reconnected: list[bool] = []
    events: list[str] = []
    gw = XenstoreGateway(
        _config(xenstored),
        on_connection_lost=lost.append,
        on_reconnected=lambda: reconnected.append(gw.connected),
    )
    await gw.connect()
    try:
        await gw.watch("/local/domain", "domains", lambda p, t: events.append(p))
        await gw.write("/local/domain/1/name", b"before")
        await eventually(lambda: "/local/domain/1/name" in events)

        xenstored.stop()
        await eventually(lambda: lost)
        assert not gw.connected
        with pytest.raises(ConnectionLost):
            await gw.read("/local/domain/1/name")  # fails at once, nothing queued

        xenstored.start()  # same socket path, empty store
        await eventually(lambda: reconnected)
        assert reconnected == [True] and gw.connected and gw.reconnects == 1

        events.clear()
        with RawClient(str(xenstored.socket_path)) as toolstack:
            toolstack.write(b"/local/domain/2/name", b"after")
        await eventually(lambda: "/local/domain/2/name" in events)  # the watch was re-armed
        assert await gw.read("/local/domain/2/name") == b"after"
    finally:
        await gw.close()


@pytest_twisted.ensureDeferred
async def test_a_transaction_in_flight_when_xenstored_dies_fails_instead_of_hanging(
    gateway: XenstoreGateway, xenstored: SandboxXenstored
) -> None:
    await gateway.write("/vm/u3/name", b"x")
    started = threading.Event()
    proceed = threading.Event()

    def slow(tx: Transaction) -> bytes:
        tx.read("/vm/u3/name")
        started.set()
        assert proceed.wait(10)
        return tx.read("/vm/u3/name")

    pending = gateway.transaction(slow)
    await eventually(started.is_set)
    xenstored.stop()
    proceed.set()
    with pytest.raises(ConnectionLost):
        await pending


@pytest_twisted.ensureDeferred
async def test_xenbus_transport_reports_a_missing_device(xenstored: SandboxXenstored) -> None:
    config = _config(xenstored, transport="xenbus", xenbus_path=str(xenstored.instance_dir / "x"))
    gw = XenstoreGateway(config)
    with pytest.raises(ConnectionLost) as err:
        await gw.connect()
    assert "/x" in str(err.value)
    await gw.close()


def test_config_comes_from_the_daemon_xenstore_table() -> None:
    from pathlib import Path

    from shyped.service.config import XenstoreConfig

    config = GatewayConfig.from_xenstore_config(
        XenstoreConfig(transport="xenbus", socket=Path("/run/xs"), reconnect_max_backoff=7.0),
        workers=1,
    )
    assert (config.transport, config.socket_path, config.reconnect_max) == ("xenbus", "/run/xs", 7)
    assert config.workers == 1
    with pytest.raises(ValueError):
        GatewayConfig(transport="tcp")
    with pytest.raises(ValueError):
        GatewayConfig(reconnect_max=0)


@pytest_twisted.ensureDeferred
async def test_close_fails_later_requests(gateway: XenstoreGateway) -> None:
    await gateway.close()
    assert not gateway.connected
    with pytest.raises(ConnectionLost):
        await gateway.read("/")
    with pytest.raises(ConnectionLost):
        await gateway.transaction(lambda tx: None)


# -- flooding ------------------------------------------------------------------------------


def _flood(xsd: SandboxXenstored, prefix: str, distinct: int, seconds: float) -> Any:
    return subprocess.Popen(
        [sys.executable, "-m", "shyped.xenstore.rawclient", "flood", "--socket",
         str(xsd.socket_path), "--prefix", prefix, "--rate", "10000",
         "--duration", str(seconds), "--distinct", str(distinct)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_flood_from_one_guest_stays_bounded_and_others_still_get_events(
    xenstored: SandboxXenstored,
) -> None:
    gw = XenstoreGateway(_config(xenstored, max_pending_events=50, max_events_per_turn=20))
    await gw.connect()
    try:
        hostile: list[str] = []
        overflowed: list[str] = []
        quiet: list[str] = []

        def slow_handler(path: str, token: str) -> None:
            hostile.append(path)
            time.sleep(0.0005)  # a daemon slower than the guest: the queue fills up

        await gw.watch("/local/domain/5", "dom5", slow_handler, overflowed.append)
        # The queue is shared: while the flood keeps it full, the quiet guest's event may be
        # dropped too, but never silently: its watch is told it overflowed (the daemon then
        # reads that tree again, `shyped.service.eventpath`).
        quiet_overflowed: list[str] = []
        await gw.watch(
            "/local/domain/6", "dom6", lambda p, t: quiet.append(p), quiet_overflowed.append
        )

        flood = _flood(xenstored, "/local/domain/5/data", distinct=500, seconds=1.5)
        await eventually(lambda: len(hostile) > 100)  # the flood is under way
        await gw.write("/local/domain/6/device/vbd/0/state", b"3")
        # A liveness bound, not a timing assertion: generous for a loaded 2-core CI machine.
        await eventually(
            lambda: "/local/domain/6/device/vbd/0/state" in quiet or quiet_overflowed,
            timeout=60.0,
        )
        out, _ = flood.communicate(timeout=30)
        assert flood.returncode == 0, out
        writes = int(out.split()[0])

        stats = gw.stats().events
        assert stats.high_water <= 50
        assert stats.received >= writes * 0.9  # nearly every write produced an event...
        assert len(hostile) < stats.received  # ...but fewer were delivered
        # dropped events are charged to their lane: the subtree below the watch they were in
        assert overflowed and all(p == "/local/domain/5/data" for p in overflowed)
        assert gw.connected
    finally:
        await gw.close()


@pytest_twisted.ensureDeferred
async def test_a_guest_backlog_does_not_delay_another_guests_event(
    gateway: XenstoreGateway, xenstored: SandboxXenstored
) -> None:
    seen: list[str] = []
    await gateway.watch("/local/domain", "domains", lambda p, t: seen.append(p))
    await eventually(lambda: seen)
    seen.clear()
    # While the reactor is busy, guest 5 piles up 300 distinct events, then guest 6 writes.
    with RawClient(str(xenstored.socket_path)) as writer:
        for i in range(300):
            writer.write(b"/local/domain/5/data/k%d" % i, b"x")
        writer.write(b"/local/domain/6/device/vbd/0/state", b"3")
        time.sleep(0.3)  # the reader thread queues them all meanwhile
    await eventually(lambda: len(seen) == 301)
    assert seen.index("/local/domain/6/device/vbd/0/state") <= 1  # served in the first round
    assert [p for p in seen if "/5/" in p] == [f"/local/domain/5/data/k{i}" for i in range(300)]


@pytest_twisted.ensureDeferred
async def test_repeated_writes_to_one_node_coalesce(xenstored: SandboxXenstored) -> None:
    gw = XenstoreGateway(_config(xenstored))
    await gw.connect()
    try:
        seen: list[str] = []
        await gw.watch("/local/domain/5", "dom5", lambda p, t: seen.append(p))
        flood = _flood(xenstored, "/local/domain/5/data", distinct=1, seconds=1.0)
        out, _ = flood.communicate(timeout=30)
        assert flood.returncode == 0, out
        await gw.read("/local/domain/5/data/k0")  # events sent before this reply were delivered
        stats = gw.stats().events
        assert stats.pending == 0
        assert stats.dropped == 0  # duplicates never count against the bound
        assert len(seen) + stats.coalesced == stats.received
        assert stats.coalesced > 0
    finally:
        await gw.close()
