"""Stopping the daemon while domains come and go (``systemctl stop`` in the middle of a watch
batch, a reconcile, a domain's release or a device cut): the work in flight is finished or
abandoned in order, one line says what was abandoned, and no traceback reaches the journal."""

from __future__ import annotations

import contextlib
import gc
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from daemon_helpers import Harness, domcfg, eventually, host_fixture, image
from process_helpers import ShypedProcess, wait_until
from test_daemon_process import write_config
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher

from shyped.sandbox.toolstack import Toolstack
from shyped.sandbox.xenstored import SandboxXenstored

host = host_fixture


@contextlib.contextmanager
def logged() -> Iterator[list[str]]:
    """Every line the daemon logs meanwhile, with the traceback of any failure logged."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        text = formatEvent(event) or ""
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        lines.append(f"[{event.get('log_namespace')}#{event.get('log_level').name}] {text}")

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        gc.collect()  # an unhandled failure in a Deferred is logged when it is collected
        globalLogPublisher.removeObserver(observe)


def assert_orderly(lines: list[str]) -> None:
    text = "\n".join(lines)
    assert "Traceback" not in text, text
    assert "Unhandled error" not in text, text
    assert not [line for line in lines if "#error]" in line or "#critical]" in line], text
    assert len([line for line in lines if "shyped stopped" in line]) == 1, text


def stop_inside(host: Harness, method: str) -> list[Deferred[None]]:
    """Stop the daemon right after its gateway sent the first request of `method` (the
    request is then in flight when the stop begins)."""
    assert host.daemon is not None
    daemon, gateway = host.daemon, host.daemon.gateway
    real: Callable[..., Any] = getattr(gateway, method)
    stops: list[Deferred[None]] = []

    def send(*args: Any, **kw: Any) -> Any:
        d = real(*args, **kw)
        if not stops:
            stops.append(daemon.stop())
        return d

    setattr(gateway, method, send)
    return stops


@pytest_twisted.ensureDeferred
async def test_a_stop_in_the_middle_of_a_watch_batch_finishes_it_first(host: Harness) -> None:
    with logged() as lines:
        await host.start()
        stops = stop_inside(host, "read_nodes")
        creating = defer.ensureDeferred(
            host.call(
                host.ts.create,
                domcfg("web-a1", vifs=["bridge=xenbr-bank-a"], disks=[image("web-a1")]),
            )
        )
        await eventually(lambda: stops)
        await stops[0]
        host.daemon = None
        await creating
    assert_orderly(lines)


@pytest_twisted.ensureDeferred
async def test_a_stop_in_the_middle_of_a_reconcile_finishes_it_first(host: Harness) -> None:
    await host.call(host.ts.create, domcfg("web-a1", disks=[image("web-a1")]))
    with logged() as lines:
        await host.start()
        stops = stop_inside(host, "scan")
        assert host.daemon is not None
        host.daemon.reconcile("test")
        await eventually(lambda: stops)
        await stops[0]
        host.daemon = None
    assert_orderly(lines)


@pytest_twisted.ensureDeferred
async def test_a_stop_while_a_cut_waits_for_its_backend_abandons_it_in_one_line(
    host: Harness,
) -> None:
    with logged() as lines:
        daemon = await host.start(host.config(close_timeout=60.0))
        await host.call(
            host.ts.create, domcfg("web-a1", vifs=["bridge=xenbr-bank-b"], disks=[image("web-a1")])
        )
        # The cut waits for the backend. (Not "the enforcer is busy": the domain's label write
        # makes it busy first, and a stop then may come before the vif's cut has begun.)
        await eventually(lambda: bool(daemon.enforcer._waiters))
        await daemon.stop()
        host.daemon = None
    assert_orderly(lines)
    (line,) = [x for x in lines if "shyped stopped" in x]
    assert "1 action(s) in flight abandoned" in line, line


# ---- the process, as systemd stops it --------------------------------------------------


@pytest.fixture
def toolstack(xenstored: SandboxXenstored) -> Iterator[Toolstack]:
    ts = Toolstack(xenstored.socket_path)
    ts.boot_host()
    yield ts


def _churn(ts: Toolstack, stop: threading.Event) -> None:
    """Create domains (one with a denied vif, one the Chinese Wall refuses) and destroy them
    again, until told to stop. The daemon destroys some under our feet: failures are fine."""
    while not stop.is_set():
        with contextlib.suppress(Exception):
            ts.create(
                domcfg(
                    "web-a1",
                    vifs=["bridge=xenbr-bank-a", "bridge=xenbr-bank-b"],
                    disks=[image("web-a1")],
                )
            )
        with contextlib.suppress(Exception):
            ts.create(domcfg("web-b1"))
        for dom in ts.list_domains():
            if dom.domid != 0:
                with contextlib.suppress(Exception):
                    ts.destroy(dom.domid)


@pytest.mark.parametrize("denials", [1, 3])
def test_sigterm_while_domains_come_and_go_logs_no_traceback(
    xenstored: SandboxXenstored, toolstack: Toolstack, tmp_path: Path, denials: int
) -> None:
    daemon = ShypedProcess.start(write_config(tmp_path, xenstored.socket_path), tmp_path / "log")
    stop = threading.Event()
    churn = threading.Thread(target=_churn, args=(toolstack, stop), daemon=True)
    churn.start()
    try:
        wait_until(lambda: daemon.text().count("decision: deny domain") >= denials)
        code = daemon.stop(signal.SIGTERM)
    finally:
        stop.set()
        churn.join(timeout=60)
    lines = daemon.text().splitlines()
    assert code == 0, "\n".join(lines)
    after = lines[next(i for i, x in enumerate(lines) if "Received SIGTERM" in x) :]
    assert_orderly(after)
