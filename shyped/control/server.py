"""The control socket server: a Twisted Unix-socket listener in front of a `ControlBackend`.

Why it looks like this:

- **Who may ask** is decided from the kernel's word, not the client's: `SO_PEERCRED` (uid,
  gid, pid at connect time) and `SO_PEERGROUPS` (supplementary groups). root and members of
  the admin group may change things; members of the read group may query. Anyone else still
  gets an answer (``permission-denied``) so a refused operator sees why. The socket itself is
  mode 0666: authorization is the server's, per request.
- **Nobody can starve another class**: connection slots are reserved per class (root, admin
  group, read group, others; `shyped.control.access`), so outsiders -- however many uids they
  have -- never take a slot of the read group, the admins or root.
- **Nobody can disturb the daemon or other clients**: each connection has its own buffer and
  at most one request in flight (further lines wait, and reading pauses when they pile up);
  a peer that does not read its answers is not read either (the connection is the transport's
  push producer: once `ServerLimits.write_buffer` bytes of answers wait, no further request is
  taken) and is cut off after `ServerLimits.stall_timeout`; a line longer than the peer's limit
  (64 KiB read-only, 12 MiB admin) is answered with ``too-large`` and the connection closed; a
  request line not finished within `ServerLimits.request_timeout` of its first byte is
  answered with ``request-timeout`` and closed; idle connections are closed. Expensive ops
  (policy parses, quotes) run at most `ServerLimits.heavy_per_class` at once per slot class;
  a read-group uid whose large answer (a quote bundle) waits unread on one connection gets
  ``busy`` for its further expensive requests until it reads it or is cut off. A backend
  exception becomes ``internal`` and is logged; it never reaches the reactor.
- **Refusals cannot flood the log or the audit trail**: the first refusal of a uid in an
  interval is written in full, the rest are counted and summarised once per interval
  (`shyped.control.refusals`).
- Requests are answered in order; a connection that goes away cancels its pending request
  (a `wait_admission` stops waiting).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from shyped.control.access import (
    Authorizer,
    ControlSetupError,
    ServerLimits,
    peer_credentials,
)
from shyped.control.backend import ControlBackend
from shyped.control.connections import ControlFactory, ControlProtocol
from shyped.control.listener import clear_stale_socket, listen
from shyped.service.config import ControlConfig

log = Logger(namespace="shyped.control")

__all__ = [
    "Authorizer",
    "ControlFactory",
    "ControlProtocol",
    "ControlServer",
    "ControlSetupError",
    "ServerLimits",
    "peer_credentials",
]


class ControlServer:
    """Serves `backend` on the Unix socket of `config` (see module docstring)."""

    def __init__(
        self,
        backend: ControlBackend,
        config: ControlConfig,
        *,
        reactor: Any = None,
        limits: ServerLimits | None = None,
        authorizer: Authorizer | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor: Any = reactor
        self.path = Path(config.socket)
        self.factory = ControlFactory(
            backend,
            authorizer if authorizer is not None else Authorizer.from_config(config),
            limits or ServerLimits(),
            reactor,
        )
        self._port: Any = None
        self._flush = LoopingCall(self.factory.flush_refusals)
        self._flush.clock = reactor

    def start(self) -> None:
        """Listen now; `ControlSetupError` if the socket cannot be served."""
        if not self.path.parent.exists():
            self.path.parent.mkdir(mode=0o755, parents=True)
        clear_stale_socket(self.path)
        self._port = listen(self.path, self.factory, self.factory.limits.backlog, self._reactor)
        self._flush.start(self.factory.limits.refusal_interval, now=False)
        log.info("control: listening on {path}", path=str(self.path))

    def stop(self) -> defer.Deferred[None]:
        """Stop listening, close every connection, remove the socket file."""
        if self._flush.running:
            self._flush.stop()
            self.factory.flush_refusals()
        for conn in list(self.factory.connections):
            conn.close()
        port, self._port = self._port, None
        if port is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.maybeDeferred(port.stopListening)
        return d
