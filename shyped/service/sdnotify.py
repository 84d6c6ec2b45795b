"""sd_notify(3) over ``$NOTIFY_SOCKET`` with a plain datagram socket, and a watchdog pinger.

Why not a library: the protocol is one datagram of ``KEY=VALUE`` lines to a Unix socket
(an abstract one when the path starts with ``@``), and the daemon must not need libsystemd.
`Notifier` is a no-op when systemd did not ask for notifications (no ``$NOTIFY_SOCKET``), so
the daemon calls it unconditionally. Sending never raises: a lost notification must not take
the daemon down (systemd will notice a missing READY=1 or WATCHDOG=1 by itself).

`Watchdog` pings ``WATCHDOG=1`` from a Twisted ``LoopingCall`` at half of ``$WATCHDOG_USEC``:
the pings come from the reactor itself, so a wedged reactor stops pinging and systemd
restarts the service (``WatchdogSec=`` in systemd/shyped.service). ``$WATCHDOG_PID``, when
set, must be our pid (as sd_watchdog_enabled(3) checks).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any, Final

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger(namespace="shyped.sdnotify")

READY: Final = "READY=1"
RELOADING: Final = "RELOADING=1"
STOPPING: Final = "STOPPING=1"
WATCHDOG: Final = "WATCHDOG=1"


def _address(path: str) -> str | bytes:
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    return path


def _clean(text: str) -> str:
    """One line: a STATUS= value must not smuggle more assignments in."""
    return " ".join(text.split())[:512]


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET`` (nothing when it is unset)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = _address(path) if path.startswith(("/", "@")) else None
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram with `lines`; True if it was sent."""
        if self.address is None:
            return False
        data = "\n".join(lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, self.address)
        except OSError as exc:
            log.warn("sd_notify {what} failed: {err}", what=lines[0] if lines else "", err=exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1 (after the first reconcile), with the daemon's pid."""
        return self.notify(READY, f"MAINPID={os.getpid()}", *self._status(status))

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1; call `ready` when the reload is done."""
        return self.notify(RELOADING, *self._status(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify(STOPPING, *self._status(status))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_clean(text)}")

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG)

    @staticmethod
    def _status(status: str | None) -> list[str]:
        return [f"STATUS={_clean(status)}"] if status else []

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between pings (half of ``$WATCHDOG_USEC``), or None if no watchdog is asked."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdecimal() or int(usec) == 0:
        return None
    if pid and (not pid.isdecimal() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6 / 2


class Watchdog:
    """Pings WATCHDOG=1 from the reactor every `interval` seconds while started."""

    def __init__(self, notifier: Notifier, interval: float, *, clock: Any = None) -> None:
        self.notifier = notifier
        self.interval = interval
        self._loop = LoopingCall(self.notifier.watchdog)
        if clock is not None:
            self._loop.clock = clock

    @classmethod
    def from_environment(
        cls, notifier: Notifier, environ: Mapping[str, str] | None = None, *, clock: Any = None
    ) -> Watchdog | None:
        """A watchdog if systemd asked for one (``$WATCHDOG_USEC``), else None."""
        interval = watchdog_interval(environ)
        if interval is None or not notifier.enabled:
            return None
        return cls(notifier, interval, clock=clock)

    @property
    def running(self) -> bool:
        return bool(self._loop.running)

    def start(self) -> None:
        if not self._loop.running:
            self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
