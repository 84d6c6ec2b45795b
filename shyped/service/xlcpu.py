"""CPU time per domain from ``xl list`` (a child process, bounded in time), for the metrics."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any, Final

from twisted.internet import error as twisted_error
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from shyped.service.metrics import (
    MetricsSnapshot,
    MetricsState,
    XlDomain,
    _log,
)

# ---- CPU time from xl -----------------------------------------------------------------------

_XL_LINE: Final = re.compile(
    r"^(?P<name>.+?)\s+(?P<domid>\d+)\s+(?P<mem>\d+)\s+(?P<vcpus>\d+)\s+"
    r"(?P<state>[-rbpscwSd?]{6})\s+(?P<time>\d+\.\d+)"
    r"(?:\s+(?P<uuid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}))?"
)


def parse_xl_list(text: str) -> list[XlDomain]:
    """The domains of ``xl list [-v]`` (``tools/xl/xl_info.c`` ``list_domains``: name padded to
    40, id, MiB, vCPUs, six state letters, CPU seconds with one decimal, with -v the uuid)."""
    out: list[XlDomain] = []
    for line in text.splitlines()[1:]:
        m = _XL_LINE.match(line)
        if m is None:
            continue
        out.append(XlDomain(m["name"].strip(), int(m["domid"]), m["uuid"], float(m["time"])))
    return out


class _Collect(protocol.ProcessProtocol):
    def __init__(self, done: Deferred[tuple[bytes, int]], limit: int) -> None:
        self.done = done
        self.out = bytearray()
        self.limit = limit

    def outReceived(self, data: bytes) -> None:
        if len(self.out) < self.limit:
            self.out += data[: self.limit - len(self.out)]

    def processEnded(self, reason: Failure) -> None:
        code = 0
        exc = reason.value
        if isinstance(exc, twisted_error.ProcessTerminated):
            code = exc.exitCode if exc.exitCode is not None else -1
        self.done.callback((bytes(self.out), code))


class XlCpuProvider:
    """Runs ``xl list -v`` every `interval` seconds as a child process (the reactor only reads
    its pipe) and hands the CPU times to `MetricsState.set_cpu_times`. A missing ``xl``, a
    failing one (no hypervisor) or one slower than `timeout` gives no CPU series."""

    def __init__(
        self,
        reactor: Any,
        state: MetricsState,
        xl: Sequence[str] = ("xl",),
        *,
        interval: float = 15.0,
        timeout: float = 10.0,
        max_output: int = 1 << 20,
    ) -> None:
        self._reactor = reactor
        self._state = state
        self._xl = tuple(xl)
        self._timeout = timeout
        self._max_output = max_output
        self._loop = LoopingCall(self.poll)
        self._loop.clock = reactor
        self._interval = interval
        self.failures = 0

    def available(self) -> bool:
        return bool(self._xl) and shutil.which(self._xl[0]) is not None

    def start(self) -> bool:
        """Start polling; False (and nothing started) when ``xl`` is not installed."""
        if not self.available():
            return False
        self._loop.start(self._interval, now=True)
        return True

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def poll(self) -> Deferred[None]:
        """One ``xl list -v``; never fails (a failure clears the CPU series)."""
        exe = shutil.which(self._xl[0]) if self._xl else None
        if exe is None:
            self._state.set_cpu_times(None)
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        done: Deferred[tuple[bytes, int]] = Deferred()
        proc = _Collect(done, self._max_output)
        transport = self._reactor.spawnProcess(
            proc,
            exe,
            [self._xl[0], *self._xl[1:], "list", "-v"],
            env={**os.environ, "LC_ALL": "C"},
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        transport.closeStdin()
        killer = self._reactor.callLater(self._timeout, _kill, transport)

        def finished(result: tuple[bytes, int]) -> None:
            if killer.active():
                killer.cancel()
            out, code = result
            if code != 0:
                if self.failures == 0:
                    _log.info("xl list failed (exit {code}): no CPU time series", code=code)
                self.failures += 1
                self._state.set_cpu_times(None)
                return
            self._state.set_cpu_times(parse_xl_list(out.decode("utf-8", "replace")))

        return done.addCallback(finished)


def _kill(transport: Any) -> None:
    with contextlib.suppress(twisted_error.ProcessExitedAlready):
        transport.signalProcess("KILL")


def cpu_by_domid(snap: MetricsSnapshot) -> Mapping[int, float]:
    """The CPU seconds a snapshot holds, by domid (empty without a provider)."""
    return {} if snap.metering is None else {m.domid: m.cpu_seconds for m in snap.metering}
