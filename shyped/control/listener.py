"""The control socket's listening side: a stale socket file is cleared, a live one refused, and
connections are accepted a few per reactor turn."""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path
from typing import Any, Final

from twisted.internet import unix

from shyped.control.access import ControlSetupError

#: Connections accepted per reactor turn at most (a connect flood waits in the listen queue).
ACCEPTS_PER_TURN: Final = 8


def clear_stale_socket(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse a live one or a non-socket."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSetupError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            path.unlink(missing_ok=True)
            return
        raise ControlSetupError(f"{path}: cannot check the existing socket: {exc}") from None
    finally:
        probe.close()
    raise ControlSetupError(f"{path}: another daemon is listening there")


class _ControlPort(unix.Port):
    """Twisted's Unix listening port, accepting at most `ACCEPTS_PER_TURN` connections per
    reactor turn: Twisted grows its accept batch without bound while connections keep coming,
    so a local connect flood would otherwise hold the reactor (and every decision) for as
    many accepts as the listen queue holds."""

    def doRead(self) -> Any:
        self.numberAccepts = min(self.numberAccepts, ACCEPTS_PER_TURN)
        return super().doRead()  # type: ignore[no-untyped-call]


def listen(path: Path, factory: Any, backlog: int, reactor: Any) -> Any:
    """Listen on `path` (mode 0666: authorization is per request) with `_ControlPort`."""
    port_type: Any = _ControlPort  # Twisted's port classes are not typed
    port = port_type(os.fspath(path), factory, backlog, 0o666, reactor, False)
    port.startListening()
    return port
