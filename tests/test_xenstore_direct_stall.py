"""oxenstored 4.17 stops reading a connection for good once the watch events its writes
fired pile up past a watcher's queues, even after that watcher has read them all.

oxenstored (``tools/ocaml/xenstored``, since XSA-326) queues the events a connection's write
fires in a pipe of that connection until every watcher's queue has room (the watcher's
output, ``quota-maxwatchevents`` = 1,024, then the watch's own pipe, as many again); while
that pipe is not empty it reads no request from the writer. The pipe is flushed only when
the writer itself is processed again: when it has a reply to send or a request read. A
writer that has received all its replies is never processed again: it is wedged, whatever
the watcher reads afterwards (the first test shows it with two raw connections).

That is how a bench daemon started over 1,000 domains hung (a hang that did not come back in
3 runs): its label writes (four events each) go on the gateway's direct connection; the
watch connection, its reader thread starved while the reactor decides 1,000 domains, fell
more than 2,048 events behind; the direct connection wedged with a request unread (seen:
36 bytes in oxenstored's receive queue of that socket, none anywhere else), the label write
never finished, and ``settled()`` waited on the enforcer for ever.

The gateway now notices a direct connection whose oldest request goes unanswered for
`STALL_AFTER`, drops it (its calls run again on the gateway's own connection, as when it is
lost) and opens a fresh one.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from shyped.sandbox.xenstored import SandboxXenstored
from shyped.xenstore import GatewayConfig, Op, XenstoreGateway, direct, wire

#: Events past what oxenstored queues for one watcher (1,024 + 1,024 here).
FLOOD = 2500


def _conn(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def _send(sock: socket.socket, op: int, payload: bytes, req_id: int) -> None:
    sock.sendall(wire.HEADER.pack(op, req_id, 0, len(payload)) + payload)


def _drain(sock: socket.socket, quiet: float) -> list[tuple[int, int, bytes]]:
    """Every message that arrives until none has for `quiet` seconds."""
    sock.settimeout(quiet)
    buf = bytearray()
    try:
        while chunk := sock.recv(1 << 16):
            buf += chunk
    except TimeoutError:
        pass
    return list(wire.take_frames(buf))


def _writes(count: int) -> bytes:
    frames = b""
    for i in range(count):
        payload = wire.write_payload(b"/x/n%05d" % i, b"v")
        frames += wire.HEADER.pack(Op.WRITE, 100 + i, 0, len(payload)) + payload
    return frames


@pytest.fixture(name="lagging_watcher")
def lagging_watcher_fixture(xenstored: SandboxXenstored) -> Iterator[socket.socket]:
    """A connection watching /x that reads nothing until the test drains it."""
    watcher = _conn(str(xenstored.socket_path))
    _send(watcher, Op.WATCH, wire.watch_payload(b"/x", b"tok"), 1)
    time.sleep(0.1)
    yield watcher
    watcher.close()


def test_oxenstored_never_reads_a_writer_again_once_its_events_overflowed_a_watcher(
    xenstored: SandboxXenstored, lagging_watcher: socket.socket
) -> None:
    writer = _conn(str(xenstored.socket_path))
    writer.sendall(_writes(FLOOD))
    replies = _drain(writer, 1.0)
    assert 0 < len(replies) < FLOOD  # it stopped reading the writer's requests
    _drain(lagging_watcher, 1.0)  # the watcher catches up
    _send(writer, Op.READ, b"/\0", 7)
    assert _drain(writer, 2.0) == []  # not even a READ is answered, now or ever
    writer.close()


@pytest.fixture(name="gateway")
def gateway_fixture(
    xenstored: SandboxXenstored, monkeypatch: pytest.MonkeyPatch
) -> Iterator[XenstoreGateway]:
    monkeypatch.setattr(direct, "STALL_AFTER", 0.5)
    gw = XenstoreGateway(GatewayConfig(socket_path=str(xenstored.socket_path)))
    pytest_twisted.blockon(gw.connect())
    yield gw
    pytest_twisted.blockon(gw.close())


@pytest_twisted.ensureDeferred
async def test_a_wedged_direct_connection_is_dropped_and_its_calls_run_on_the_gateway(
    gateway: XenstoreGateway, lagging_watcher: socket.socket
) -> None:
    assert gateway.direct
    # One transaction on the direct connection fires FLOOD events at the lagging watcher.
    changes = [(Op.WRITE, f"/x/n{i:05d}", b"v") for i in range(FLOOD)]
    assert await gateway.apply_if(None, b"", changes)
    _drain(lagging_watcher, 0.5)  # it catches up: too late for oxenstored
    wedged = gateway._direct
    # A label write after it: on the wedged connection it never finished.
    write = gateway.apply_if(None, b"", [(Op.WRITE, "/y/label", b"web")])
    write.addTimeout(30, reactor)
    assert await write
    assert await gateway.read("/y/label") == b"web"
    # A fresh direct connection took the wedged one's place.
    await task.deferLater(reactor, 0.2, lambda: None)
    assert gateway.direct and gateway._direct is not wedged
    assert await gateway.read_nodes(["/y/label"], []) == ({"/y/label": b"web"}, {})


@pytest_twisted.ensureDeferred
async def test_a_busy_but_answering_direct_connection_is_kept(
    gateway: XenstoreGateway,
) -> None:
    first = gateway._direct
    for i in range(20):  # requests answered within the bound: no stall
        await gateway.apply_if(None, b"", [(Op.WRITE, f"/z/n{i}", b"1")])
        await task.deferLater(reactor, 0.05, lambda: None)
    await defer.succeed(None)
    assert gateway._direct is first and gateway.direct
