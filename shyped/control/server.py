"""The control socket server: a Twisted Unix-socket listener in front of a `ControlBackend`.

Why it looks like this:

- **Who may ask** is decided from the kernel's word, not the client's: `SO_PEERCRED` (uid,
  gid, pid at connect time) and `SO_PEERGROUPS` (supplementary groups). root and members of
  the admin group may change things; members of the read group may query. Anyone else still
  gets an answer (``permission-denied``) so a refused operator sees why, and the refusal is
  logged (and, for change requests, passed to `ControlBackend.audit`). The socket itself is
  mode 0666: authorization is the server's, per request.
- **Nobody can disturb the daemon or other clients**: each connection has its own buffer and
  at most one request in flight (further lines wait, and reading pauses when they pile up);
  a line longer than the peer's limit (64 KiB read-only, 12 MiB admin) is answered with
  ``too-large`` and the connection closed; a request line not finished within
  `ServerLimits.request_timeout` of its first byte is answered with ``request-timeout`` and
  closed (a slow writer cannot hold it open by trickling bytes); idle connections are closed;
  connections are capped in total and per uid (root and admins have a reserve so unprivileged
  users cannot lock them out). A backend exception becomes ``internal`` and is logged; it
  never reaches the reactor.
- Requests are answered in order; a connection that goes away cancels its pending request
  (a `wait_admission` stops waiting).
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat
import struct
from collections import Counter
from pathlib import Path
from typing import Any, Final

import attrs
from twisted.internet import defer
from twisted.internet.base import DelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from shyped import __version__
from shyped.config import ControlConfig
from shyped.control.backend import Access, ControlAudit, ControlBackend, NoArgs, Peer, Pong
from shyped.control.protocol import (
    MAX_ADMIN_LINE,
    MAX_READ_LINE,
    VERSION,
    ControlError,
    ErrorCode,
    Request,
    RequestId,
    decode_line,
    encode_error,
    encode_result,
    parse_document,
    request_id,
)

log = Logger(namespace="shyped.control")

#: Linux's SO_PEERGROUPS (not exported by every Python build).
SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)
#: Requests handled for one connection before the reactor serves others.
LINES_PER_TURN: Final = 16
#: CPython caps getsockopt buffers at 1024 bytes: 256 supplementary groups.
_GROUPS_BUF: Final = 1024


class ControlSetupError(Exception):
    """The control socket cannot be served (bad group name, path in use ...)."""


@attrs.frozen
class ServerLimits:
    """Per-connection and global limits; defaults suit a dom0."""

    max_connections: int = 64  #: connections of read-only peers, in total
    max_connections_per_uid: int = 8  #: per non-root uid
    admin_reserve: int = 16  #: extra connections only root/admins may use
    request_timeout: float = 10.0  #: seconds from a request's first byte to its newline
    idle_timeout: float = 600.0  #: seconds without a request in flight before closing
    max_read_line: int = MAX_READ_LINE
    max_admin_line: int = MAX_ADMIN_LINE


# --------------------------------------------------------------------------- authorization


def peer_credentials(sock: socket.socket) -> Peer:
    """The connecting process's uid/gid/pid and supplementary groups, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: tuple[int, ...] = ()
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _GROUPS_BUF)
        groups = tuple(struct.unpack(f"{len(data) // 4}I", data[: len(data) // 4 * 4]))
    except OSError as exc:  # ERANGE: more than 256 groups; ENOPROTOOPT: old kernel
        log.warn("control: cannot read peer groups of pid {pid}: {err}", pid=pid, err=exc)
    return Peer(uid=uid, gid=gid, pid=pid, groups=groups)


@attrs.frozen
class Authorizer:
    """root and `admin_gids` members may change things; `read_gids` members may query."""

    read_gids: frozenset[int] = frozenset()
    admin_gids: frozenset[int] = frozenset()

    @classmethod
    def from_config(cls, config: ControlConfig) -> Authorizer:
        return cls(
            read_gids=_gids(config.read_group, "control.read_group"),
            admin_gids=_gids(config.admin_group, "control.admin_group"),
        )

    def access(self, peer: Peer) -> Access | None:
        """What `peer` may do: ``admin``, ``read`` or nothing (None)."""
        gids = {peer.gid, *peer.groups}
        if peer.uid == 0 or gids & self.admin_gids:
            return "admin"
        if gids & self.read_gids:
            return "read"
        return None


def _gids(name: str | None, key: str) -> frozenset[int]:
    if name is None:
        return frozenset()
    try:
        return frozenset({grp.getgrnam(name).gr_gid})
    except KeyError:
        if name.isdecimal():
            return frozenset({int(name)})
        raise ControlSetupError(f"{key}: no group named {name!r}") from None


def allowed(have: Access | None, need: Access) -> bool:
    return have == "admin" or (have == "read" and need == "read")


# --------------------------------------------------------------------------- connections


class ControlProtocol(Protocol):
    """One client connection: line framing, limits, authorization, one request at a time."""

    factory: ControlFactory

    def __init__(self) -> None:
        self._buf = bytearray()
        self._busy = False
        self._closing = False
        self._paused = False
        self._pending: defer.Deferred[Any] | None = None
        self._request_timer: DelayedCall | None = None
        self._idle_timer: DelayedCall | None = None
        self._later: DelayedCall | None = None
        self._draining = False
        self.peer = Peer(uid=-1, gid=-1, pid=0)
        self.access: Access | None = None
        self._admitted = False

    @property
    def _tx(self) -> Any:
        """The transport (Twisted's interfaces type poorly here)."""
        return self.transport

    # ---- life cycle

    def connectionMade(self) -> None:
        try:
            self.peer = peer_credentials(self._tx.getHandle())
        except OSError as exc:
            log.warn("control: cannot read peer credentials: {err}", err=exc)
            self._close_with(None, ControlError(ErrorCode.PERMISSION_DENIED, "unknown peer"))
            return
        self.access = self.factory.authorizer.access(self.peer)
        why = self.factory.admit(self)
        if why is not None:
            log.warn(
                "control: refused connection from uid={uid} pid={pid}: {why}",
                uid=self.peer.uid,
                pid=self.peer.pid,
                why=why,
            )
            self._close_with(None, ControlError(ErrorCode.BUSY, why))
            return
        self._admitted = True
        self._arm_idle()

    def connectionLost(self, reason: Any = None) -> None:
        self._closing = True
        for timer in (self._request_timer, self._idle_timer, self._later):
            if timer is not None and timer.active():
                timer.cancel()
        self._request_timer = self._idle_timer = self._later = None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        if self._admitted:
            self.factory.release(self)
            self._admitted = False

    # ---- input

    @property
    def max_line(self) -> int:
        limits = self.factory.limits
        return limits.max_admin_line if self.access == "admin" else limits.max_read_line

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._buf += data
        self._drain()

    def _drain(self) -> None:
        """Handle the complete lines in the buffer, a few per reactor turn.

        Re-entrant calls (an answer that completes synchronously inside `_handle`) return at
        once; the loop below picks the next line up. After `LINES_PER_TURN` lines the rest
        waits for the next turn, so one client's pipelined flood cannot hog the reactor.
        """
        if self._draining or self._closing:
            return
        self._draining = True
        try:
            self._drain_lines()
        finally:
            self._draining = False
        if self._busy and not self._paused and len(self._buf) > self.max_line:
            self._paused = True
            self._tx.pauseProducing()

    def _drain_lines(self) -> None:
        handled = 0
        while not self._busy and not self._closing:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self.max_line:
                    self._too_large()
                elif self._buf.strip():
                    self._arm_request_timer()
                else:
                    self._buf.clear()
                return
            if handled >= LINES_PER_TURN:
                if self._later is None:
                    self._later = self.factory.clock.callLater(0, self._drain_later)
                return
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            self._cancel_request_timer()
            if len(line) > self.max_line:
                self._too_large()
                return
            if line.strip():
                handled += 1
                self._handle(line)

    def _drain_later(self) -> None:
        self._later = None
        self._drain()

    def _too_large(self) -> None:
        self._close_with(
            None,
            ControlError(
                ErrorCode.TOO_LARGE,
                f"request line longer than {self.max_line} bytes",
                {"limit": self.max_line},
            ),
        )

    # ---- timers

    def _arm_request_timer(self) -> None:
        if self._request_timer is None:
            self._request_timer = self.factory.clock.callLater(
                self.factory.limits.request_timeout, self._request_timed_out
            )

    def _cancel_request_timer(self) -> None:
        if self._request_timer is not None:
            if self._request_timer.active():
                self._request_timer.cancel()
            self._request_timer = None

    def _request_timed_out(self) -> None:
        self._request_timer = None
        log.info(
            "control: request from uid={uid} pid={pid} not finished in time",
            uid=self.peer.uid,
            pid=self.peer.pid,
        )
        self._close_with(
            None,
            ControlError(
                ErrorCode.REQUEST_TIMEOUT,
                f"request line not finished within {self.factory.limits.request_timeout:g}s",
            ),
        )

    def _arm_idle(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(self.factory.limits.idle_timeout)
        else:
            self._idle_timer = self.factory.clock.callLater(
                self.factory.limits.idle_timeout, self._idle_timed_out
            )

    def _idle_timed_out(self) -> None:
        self._idle_timer = None
        if self._busy:
            self._arm_idle()
            return
        self._closing = True
        self._tx.loseConnection()

    # ---- requests

    def _handle(self, line: bytes) -> None:
        rid: RequestId = None
        try:
            doc = decode_line(line)
            rid = request_id(doc)
            request = parse_document(doc)
            self._authorize(request)
        except ControlError as exc:
            self._send_error(rid, exc)
            return
        self._busy = True
        self._arm_idle()
        d = defer.maybeDeferred(self._dispatch, request)
        self._pending = d
        d.addCallbacks(self._done, self._failed, callbackArgs=(request,), errbackArgs=(request,))

    def _dispatch(self, request: Request) -> Any:
        if request.op.name == "ping":  # answered by the server itself: is anyone there?
            return Pong(protocol=VERSION, daemon=f"shyped {__version__}")
        method = getattr(self.factory.backend, request.op.method)
        if isinstance(request.args, NoArgs):
            return method()
        return method(request.args)

    def _authorize(self, request: Request) -> None:
        op = request.op
        if allowed(self.access, op.access):
            return
        need = "root or the admin group" if op.access == "admin" else "the read group"
        exc = ControlError(
            ErrorCode.PERMISSION_DENIED,
            f"{op.name!r} needs {need} (uid {self.peer.uid}, gid {self.peer.gid})",
        )
        log.warn(
            "control: refused {op} from uid={uid} gid={gid} pid={pid}",
            op=op.name,
            uid=self.peer.uid,
            gid=self.peer.gid,
            pid=self.peer.pid,
        )
        if op.access == "admin":
            self._audit(request, allowed=False, code=str(exc.code), summary=exc.message)
        raise exc

    def _done(self, result: Any, request: Request) -> None:
        self._pending = None
        if request.op.access == "admin":
            self._audit(request, allowed=True, code=None, summary="ok")
        if not isinstance(result, request.op.result):
            log.error(
                "control: backend returned {kind} for {op}",
                kind=type(result).__name__,
                op=request.op.name,
            )
            self._answer(encode_error(request.id, _internal()))
            return
        self._answer(encode_result(request.id, result))

    def _failed(self, failure: Failure, request: Request) -> None:
        self._pending = None
        if isinstance(failure.value, defer.CancelledError) and self._closing:
            return
        exc = failure.value
        if not isinstance(exc, ControlError):
            log.failure("control: {op} failed", failure, op=request.op.name)
            exc = _internal()
        if request.op.access == "admin":
            self._audit(request, allowed=True, code=str(exc.code), summary=exc.message)
        self._answer(encode_error(request.id, exc))

    def _audit(self, request: Request, *, allowed: bool, code: str | None, summary: str) -> None:
        event = ControlAudit(
            peer=self.peer, op=request.op.name, allowed=allowed, code=code, summary=summary
        )
        try:
            self.factory.backend.audit(event)
        except Exception:
            log.failure("control: audit of {op} failed", op=request.op.name)

    # ---- output

    def _answer(self, data: bytes) -> None:
        self._busy = False
        if self._closing:
            return
        self._tx.write(data)
        self._arm_idle()
        if self._paused:
            self._paused = False
            self._tx.resumeProducing()
        self._drain()

    def close(self) -> None:
        """Close this connection (server shutdown)."""
        self._closing = True
        if self.transport is not None:
            self._tx.loseConnection()

    def _send_error(self, rid: RequestId, exc: ControlError) -> None:
        if not self._closing:
            self._tx.write(encode_error(rid, exc))

    def _close_with(self, rid: RequestId, exc: ControlError) -> None:
        self._send_error(rid, exc)
        self._closing = True
        self._buf.clear()
        self._tx.loseConnection()


def _internal() -> ControlError:
    return ControlError(ErrorCode.INTERNAL, "internal error in the daemon (see its log)")


class ControlFactory(Factory):
    """Shared state of the connections: backend, limits, and who is connected."""

    protocol = ControlProtocol  # type: ignore[assignment]

    def __init__(
        self,
        backend: ControlBackend,
        authorizer: Authorizer,
        limits: ServerLimits,
        clock: Any,
    ) -> None:
        self.backend = backend
        self.authorizer = authorizer
        self.limits = limits
        self.clock = clock
        self.connections: set[ControlProtocol] = set()
        self._per_uid: Counter[int] = Counter()
        self._unprivileged = 0

    def admit(self, conn: ControlProtocol) -> str | None:
        """Count a new connection in, or say why it is refused."""
        limits = self.limits
        privileged = conn.access == "admin"
        total = len(self.connections)
        if privileged:
            if total >= limits.max_connections + limits.admin_reserve:
                return "too many connections"
        else:
            if self._unprivileged >= limits.max_connections:
                return "too many connections"
            if self._per_uid[conn.peer.uid] >= limits.max_connections_per_uid:
                return f"too many connections from uid {conn.peer.uid}"
            self._unprivileged += 1
        self._per_uid[conn.peer.uid] += 1
        self.connections.add(conn)
        return None

    def release(self, conn: ControlProtocol) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self._per_uid[conn.peer.uid] -= 1
        if self._per_uid[conn.peer.uid] <= 0:
            del self._per_uid[conn.peer.uid]
        if conn.access != "admin":
            self._unprivileged -= 1


# --------------------------------------------------------------------------- the server


def _clear_stale_socket(path: Path) -> None:
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

    def start(self) -> None:
        """Listen now; `ControlSetupError` if the socket cannot be served."""
        if not self.path.parent.exists():
            self.path.parent.mkdir(mode=0o755, parents=True)
        _clear_stale_socket(self.path)
        self._port = self._reactor.listenUNIX(
            os.fspath(self.path), self.factory, mode=0o666, wantPID=False
        )
        log.info("control: listening on {path}", path=str(self.path))

    def stop(self) -> defer.Deferred[None]:
        """Stop listening, close every connection, remove the socket file."""
        for conn in list(self.factory.connections):
            conn.close()
        port, self._port = self._port, None
        if port is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.maybeDeferred(port.stopListening)
        return d
