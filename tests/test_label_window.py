"""The daemon's own label writes leave room in its watch queues for everyone else's events.

oxenstored 4.17 holds the events a request fires in the *writer's* connection while the
watcher's queues are full, and flushes them only when it processes that writer again
(`shyped.service.labelwindow`). A daemon cold-starting over 1,000 domains wrote 1,000 labels
(4,000 events on its own watch) at once; a domain created right after ``settled()`` by a
toolstack that then only waits was never decided: its creation's events stayed in the
toolstack's connection (``benchmarks/bench_daemon_scale.py`` hung there for > 10 minutes).
Before `LabelWindow`, `test_domain_created_during_the_label_flood_is_decided` failed so
(no label after 60 s).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task, threads

from shyped.core.labelstore import LabelStore
from shyped.sandbox import layout as L
from shyped.sandbox.toolstack_base import apply_ops
from shyped.sandbox.xenstored import SandboxXenstored
from shyped.sandbox.xsconn import XsConn
from shyped.service.config import ActuatorConfig, Config, XenstoreConfig
from shyped.service.daemon import Daemon, load_policy
from shyped.service.labelwindow import WINDOW, LabelWindow
from shyped.xenstore import GatewayConfig, XenstoreGateway, router

HOSTING = Path(__file__).resolve().parents[1] / "conf" / "policies" / "hosting.toml"
#: Domains labelled at the cold start: 4 events each, well past oxenstored's 2 x 1,024.
DOMAINS = 1000
PROBE = 32000


def _uuid(i: int) -> str:
    return f"00000000-0000-4000-9000-{i:012x}"


def _make(conn: XsConn, domid: int, name: str, uuid: str) -> None:
    """libxl's domain-creation transaction, on `conn`."""
    while True:
        conn.start()
        apply_ops(conn, L.domain_make_step(domid, name, uuid).ops)
        if conn.commit():
            return


class _NoActuator:
    def pause(self, domid: int) -> defer.Deferred[None]:
        raise AssertionError(f"unexpected veto of {domid}")

    unpause = destroy = pause


@pytest.mark.timeout(300)
@pytest_twisted.ensureDeferred
async def test_domain_created_during_the_label_flood_is_decided(
    xenstored: SandboxXenstored, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = str(xenstored.socket_path)
    # The daemon's watch reader falls behind (a busy reactor holding the GIL, a loaded
    # machine: the bench's child): here on purpose, a few events per read and a pause.
    monkeypatch.setattr(router, "_READ_CHUNK", 256)
    deliver = router._Inbox.deliver

    def slow_deliver(self: router._Inbox, calls: Any, events: Any) -> None:
        if events:
            time.sleep(0.005)
        deliver(self, calls, events)

    monkeypatch.setattr(router._Inbox, "deliver", slow_deliver)

    def populate() -> None:
        with XsConn(sock) as conn:
            for i in range(DOMAINS):
                _make(conn, i + 1, f"shop-{i}", _uuid(i))

    await threads.deferToThread(populate)
    store = LabelStore().with_domain(name="probe", label="shop")
    for i in range(DOMAINS):
        store = store.with_domain(name=f"shop-{i}", label="shop")
    cfg = Config(
        policy=HOSTING,
        xenstore=XenstoreConfig(socket=Path(sock)),
        actuator=ActuatorConfig(kind="sandbox"),
    )
    gateway = XenstoreGateway(GatewayConfig(socket_path=sock))
    daemon = Daemon(cfg, load_policy(cfg.policy), store, gateway=gateway, actuator=_NoActuator())
    await daemon.start()
    try:
        await daemon.settled()
        label = f"/local/domain/{PROBE}/shyped/label"

        def create_and_wait() -> str | None:
            # the toolstack commits the domain, then only waits (on another connection)
            with XsConn(sock) as toolstack, XsConn(sock) as looker:
                _make(toolstack, PROBE, "probe", "00000000-0000-4000-8000-00000000fffe")
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    got = looker.read(label)
                    if got is not None:
                        return got
                    time.sleep(0.05)
                return None

        got = await threads.deferToThread(create_and_wait)
        assert got is not None, "the domain created during the label flood was never decided"
        assert daemon.enforcer.labels.high_water <= WINDOW
    finally:
        await daemon.stop()


# -- the window itself -------------------------------------------------------------------


def _window(size: int = 2, wait: float = 1.0) -> tuple[LabelWindow, task.Clock]:
    clock = task.Clock()
    return LabelWindow(clock, size=size, seen_wait=wait), clock


def test_places_wait_for_the_events_of_earlier_writes() -> None:
    window, _ = _window()
    got: list[int] = []
    for i in range(3):
        window.place().addCallback(lambda _, i=i: got.append(i))
    assert got == [0, 1]
    window.written("/a")
    window.written("/b")
    assert got == [0, 1] and len(window) == 3 - 1
    window.seen("/elsewhere")  # not a label written: frees nothing
    assert got == [0, 1]
    window.seen("/a")
    assert got == [0, 1, 2] and window.high_water == 2


def test_a_write_that_wrote_nothing_frees_its_place() -> None:
    window, _ = _window(size=1)
    got: list[int] = []
    window.place().addCallback(lambda _: got.append(0))
    window.place().addCallback(lambda _: got.append(1))
    assert got == [0]
    window.released()
    assert got == [0, 1]


def test_an_event_that_never_comes_frees_the_place_after_the_wait() -> None:
    window, clock = _window(size=1, wait=1.0)
    got: list[int] = []
    window.place().addCallback(lambda _: got.append(0))
    window.place().addCallback(lambda _: got.append(1))
    window.written("/a")
    clock.advance(0.9)
    assert got == [0]
    clock.advance(0.2)
    assert got == [0, 1] and window.timeouts == 1


def test_the_same_label_twice_holds_one_place() -> None:
    window, clock = _window(size=2)
    for _ in range(2):
        window.place()
    window.written("/a")
    window.written("/a")
    assert len(window) == 1
    window.seen("/a")
    assert len(window) == 0 and not clock.getDelayedCalls()


def test_close_lets_every_waiting_write_go() -> None:
    window, clock = _window(size=1)
    got: list[int] = []
    for i in range(3):
        window.place().addCallback(lambda _, i=i: got.append(i))
    window.written("/a")
    window.close()
    assert got == [0, 1, 2] and not clock.getDelayedCalls()


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LabelWindow(task.Clock(), size=0)
