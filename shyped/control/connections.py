"""The control socket's connections: one client's `ControlProtocol` and their `ControlFactory`.

A connection frames request lines, applies its peer's limits (line length, request and idle
timers, the write buffer it pushes back on, heavy slots per class), authorizes each request,
hands it to the `ControlBackend` and writes the answer; the factory holds what connections
share: the backend, the limits, the slots per class, the tarpit, the refusal log. Why each
limit is there: `shyped.control.server`, which listens and owns the factory.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

from twisted.internet import defer
from twisted.internet.base import DelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from shyped import __version__
from shyped.control.access import (
    SLOT_CLASSES,
    Authorizer,
    ServerLimits,
    SlotClass,
    Slots,
    allowed,
    peer_credentials,
    slot_class,
)
from shyped.control.backend import Access, ControlAudit, ControlBackend, NoArgs, Peer, Pong
from shyped.control.caller import CALLER, Caller
from shyped.control.protocol import (
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
from shyped.control.refusals import RefusalLog

log = Logger(namespace="shyped.control")

#: Requests handled for one connection before the reactor serves others.
LINES_PER_TURN: Final = 16
#: Bytes of unhandled request lines beyond which a connection is no longer read.
BACKLOG: Final = 64 * 1024


# --------------------------------------------------------------------------- connections


class ControlProtocol(Protocol):
    """One client connection: line framing, limits, authorization, one request at a time.

    It is also the push producer of its own transport: the transport pauses it when answers
    pile up unread, and it then stops taking requests and stops reading.
    """

    factory: ControlFactory

    def __init__(self) -> None:
        self._buf = bytearray()
        self._busy = False
        self._closing = False
        self._reading_paused = False
        self._write_blocked = False
        self._pending: defer.Deferred[Any] | None = None
        self._request_timer: DelayedCall | None = None
        self._idle_timer: DelayedCall | None = None
        self._stall_timer: DelayedCall | None = None
        self._later: DelayedCall | None = None
        #: a heavy answer of a read-group peer waits unread in the transport's buffer
        self._unread_heavy = False
        #: the heavy slot this connection holds: from its turn until its answer is written
        self._heavy_held: defer.DeferredSemaphore | None = None
        self._draining = False
        self.peer = Peer(uid=-1, gid=-1, pid=0)
        self.access: Access | None = None
        self.slot: SlotClass = "other"
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
        self.slot = slot_class(self.peer, self.access)
        why = self.factory.admit(self)
        if why is not None:
            if self.factory.refused(self.peer, "connect"):
                log.warn(
                    "control: refused connection from uid={uid} pid={pid}: {why}",
                    uid=self.peer.uid,
                    pid=self.peer.pid,
                    why=why,
                )
            self._refuse_connection(why)
            return
        self._admitted = True
        self._tx.bufferSize = self.factory.limits.write_buffer
        self._tx.registerProducer(self, True)
        self._arm_idle()

    def _refuse_connection(self, why: str) -> None:
        """No slot: answer ``busy`` -- for an outsider only after a delay, from a bounded
        tarpit (a connect loop then waits instead of costing the reactor a connection per
        turn), and past the tarpit's size by closing at once without an answer."""
        error = ControlError(ErrorCode.BUSY, why)
        if self.slot != "other":
            self._close_with(None, error)
            return
        factory = self.factory
        if factory.tarpit >= factory.limits.tarpit_max:
            self._closing = True
            self._tx.abortConnection()
            return
        factory.tarpit += 1
        self._closing = True
        self._tx.pauseProducing()

        def release() -> None:
            factory.tarpit -= 1
            self._closing = False
            self._close_with(None, error)

        self._later = factory.clock.callLater(factory.limits.tarpit_delay, release)

    def connectionLost(self, reason: Any = None) -> None:
        if self._later is not None and self._later.active() and not self._admitted:
            self.factory.tarpit -= 1  # left the tarpit early
        self._closing = True
        for timer in (self._request_timer, self._idle_timer, self._later, self._stall_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._request_timer = self._idle_timer = self._later = self._stall_timer = None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        self._read_heavy()
        self._release_heavy()
        if self._admitted:
            self.factory.release(self)
            self._admitted = False

    # ---- flow control (IPushProducer, called by the transport)

    def pauseProducing(self) -> None:
        """Answers are piling up unread: take no more requests, stop reading, start the clock."""
        self._write_blocked = True
        self._update_reading()
        if self._stall_timer is None:
            self._stall_timer = self.factory.clock.callLater(
                self.factory.limits.stall_timeout, self._stalled
            )

    def resumeProducing(self) -> None:
        """The peer read its answers: go on."""
        self._write_blocked = False
        self._read_heavy()
        if self._stall_timer is not None:
            if self._stall_timer.active():
                self._stall_timer.cancel()
            self._stall_timer = None
        self._update_reading()
        if not self._closing and self._later is None:
            self._later = self.factory.clock.callLater(0, self._drain_later)

    def stopProducing(self) -> None:
        self._closing = True

    def _stalled(self) -> None:
        self._stall_timer = None
        if self.factory.refused(self.peer, "stalled"):
            log.info(
                "control: uid={uid} pid={pid} left its answers unread for {s:g} s: cut off",
                uid=self.peer.uid,
                pid=self.peer.pid,
                s=self.factory.limits.stall_timeout,
            )
        self._closing = True
        self._buf.clear()
        self._tx.abortConnection()

    def _update_reading(self) -> None:
        """Read from the peer only while its answers are read and its lines do not pile up."""
        if self._closing:
            return
        backlog = len(self._buf) > BACKLOG and (self._busy or b"\n" in self._buf)
        pause = self._write_blocked or backlog or len(self._buf) > self.max_line
        if pause and not self._reading_paused:
            self._reading_paused = True
            self._tx.pauseProducing()
        elif not pause and self._reading_paused:
            self._reading_paused = False
            self._tx.resumeProducing()

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
        self._update_reading()

    def _drain_lines(self) -> None:
        handled = 0
        while not self._busy and not self._closing and not self._write_blocked:
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
        if self.factory.refused(self.peer, "timeout"):
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
            if request.op.heavy and (busy := self._heavy_unread_elsewhere()) is not None:
                raise busy
        except ControlError as exc:
            self._send_error(rid, exc)
            return
        self._busy = True
        self._arm_idle()
        if request.op.heavy:
            d = self._run_heavy(request)
        else:
            d = defer.maybeDeferred(self._dispatch, request)
        self._pending = d
        d.addCallbacks(self._done, self._failed, callbackArgs=(request,), errbackArgs=(request,))

    def _heavy_unread_elsewhere(self) -> ControlError | None:
        """``busy`` when this read-group peer's uid has a heavy answer unread: a uid that leaves
        large answers (quote bundles, up to the measurement log's size) unread on many
        connections would otherwise have one made and held in memory per connection until the
        stall cut-off (64 read-group connections)."""
        if self.slot != "read" or not self.factory.unread_heavy[self.peer.uid]:
            return None
        return ControlError(
            ErrorCode.BUSY,
            f"uid {self.peer.uid} has a large answer unread on another connection: read it "
            "(or close that connection) first",
        )

    def _run_heavy(self, request: Request) -> defer.Deferred[Any]:
        """`request` in its turn among its class's heavy slots, held until its answer is
        written (`_done`, `_failed`): the next one's turn then sees whether it was left unread."""
        sem = self.factory.heavy[self.slot]

        def turn(_: object) -> Any:
            self._heavy_held = sem
            if (busy := self._heavy_unread_elsewhere()) is not None:  # since it was queued
                raise busy
            return self._dispatch(request)

        return sem.acquire().addCallback(turn)

    def _release_heavy(self) -> None:
        sem, self._heavy_held = self._heavy_held, None
        if sem is not None:
            sem.release()

    def _read_heavy(self) -> None:
        if self._unread_heavy:
            self._unread_heavy = False
            self.factory.unread_heavy[self.peer.uid] -= 1
            if self.factory.unread_heavy[self.peer.uid] <= 0:
                del self.factory.unread_heavy[self.peer.uid]

    def _dispatch(self, request: Request) -> Any:
        if self._closing:  # gone while waiting for its turn
            raise defer.CancelledError()
        if request.op.name == "ping":  # answered by the server itself: is anyone there?
            return Pong(protocol=VERSION, daemon=f"shyped {__version__}")
        method = getattr(self.factory.backend, request.op.method)
        token = CALLER.set(Caller(self.peer, self.access))  # e.g. attest_quote's rate limit
        try:
            if isinstance(request.args, NoArgs):
                return method()
            return method(request.args)
        finally:
            CALLER.reset(token)

    def _authorize(self, request: Request) -> None:
        op = request.op
        if allowed(self.access, op.access):
            return
        need = "root or the admin group" if op.access == "admin" else "the read group"
        exc = ControlError(
            ErrorCode.PERMISSION_DENIED,
            f"{op.name!r} needs {need} (uid {self.peer.uid}, gid {self.peer.gid})",
        )
        if self.factory.refused(self.peer, op.name):
            log.warn(
                "control: refused {op} from uid={uid} gid={gid} pid={pid} (further refusals "
                "of this uid are summarised every {s:g} s)",
                op=op.name,
                uid=self.peer.uid,
                gid=self.peer.gid,
                pid=self.peer.pid,
                s=self.factory.limits.refusal_interval,
            )
            if op.access == "admin":
                self._audit(request, allowed=False, code=str(exc.code), summary=exc.message)
        raise exc

    def _done(self, result: Any, request: Request) -> None:
        try:
            self._answer_result(result, request)
        finally:
            self._release_heavy()

    def _answer_result(self, result: Any, request: Request) -> None:
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
        if request.op.heavy and self.slot == "read" and self._write_blocked and not self._closing:
            self._unread_heavy = True  # until resumeProducing or connectionLost
            self.factory.unread_heavy[self.peer.uid] += 1

    def _failed(self, failure: Failure, request: Request) -> None:
        try:
            self._answer_failure(failure, request)
        finally:
            self._release_heavy()

    def _answer_failure(self, failure: Failure, request: Request) -> None:
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
        self.factory.audit(
            ControlAudit(
                peer=self.peer, op=request.op.name, allowed=allowed, code=code, summary=summary
            )
        )

    # ---- output

    def _answer(self, data: bytes) -> None:
        self._busy = False
        if self._closing:
            return
        self._tx.write(data)
        self._arm_idle()
        self._update_reading()
        self._drain()

    def close(self) -> None:
        """Close this connection (server shutdown)."""
        self._closing = True
        if self.transport is not None:
            self._tx.abortConnection() if self._write_blocked else self._tx.loseConnection()

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
    """Shared state of the connections: backend, limits, slots, refusal counts."""

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
        self.slots = Slots(limits)
        self.refusals = RefusalLog(max_uids=limits.refusal_uids)
        #: Refused outsider connections held before their answer (`ServerLimits.tarpit_max`).
        self.tarpit = 0
        #: Expensive requests (policy parses) in progress, per slot class.
        self.heavy = {cls: defer.DeferredSemaphore(limits.heavy(cls)) for cls in SLOT_CLASSES}
        #: Read-group uids with a heavy answer unread, and on how many connections.
        self.unread_heavy: Counter[int] = Counter()

    def admit(self, conn: ControlProtocol) -> str | None:
        """Count a new connection in its slot class, or say why it is refused."""
        why = self.slots.take(conn.slot, conn.peer.uid)
        if why is None:
            self.connections.add(conn)
        return why

    def release(self, conn: ControlProtocol) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self.slots.give_back(conn.slot, conn.peer.uid)

    def refused(self, peer: Peer, kind: str) -> bool:
        """Count a refusal of `peer`; True if it is to be written in full (its first now)."""
        return self.refusals.note(peer.uid, peer.gid, kind)

    def flush_refusals(self) -> None:
        """One log line and one audit record per uid refused more than once this interval."""
        interval = self.limits.refusal_interval
        for s in self.refusals.flush():
            text = s.describe(interval)
            log.warn("control: {text}", text=text)
            kinds = ",".join(kind for kind, _ in s.kinds)
            self.audit(
                ControlAudit(
                    peer=Peer(uid=s.uid, gid=s.gid, pid=0),
                    op=kinds[:200],
                    allowed=False,
                    code="refused",
                    summary=text,
                    count=s.count,
                )
            )

    def audit(self, event: ControlAudit) -> None:
        try:
            self.backend.audit(event)
        except Exception:
            log.failure("control: audit of {op} failed", op=event.op)
