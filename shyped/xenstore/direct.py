"""A second connection to xenstored, read and written on the reactor itself, without watches.

Why: the gateway's own connection (`shyped.xenstore.gateway`) carries every watch event; its
replies reach the reactor through the reader thread and the inbox, one thread hand-off (GIL
hand-over and reactor wake-up) per slice of replies, and a worker-thread transaction adds two
more (the hop to the worker and back). On a decision's path those hand-offs cost more than
xenstored's work (``benchmarks/bench_daemon.py``). This connection is a plain Twisted
protocol on xenstored's Unix socket: a request is framed and written by the reactor, its reply
parsed by the reactor when the socket is readable, its Deferred fired there; nothing queues
behind a burst of watch events, because no watch is registered on it.

It serves the latency-critical requests only: the reads of a watch batch (values and, where
needed, permissions, one pipelined send) and the label write (`DirectConnection.apply_if`:
START, then the check and the changes pipelined, then END: three round trips, no thread).
Everything else (watches, worker transactions, snapshots, the ``settled`` barrier) stays on
the gateway's connection.

Bounds: at most `MAX_INFLIGHT` requests and `MAX_INFLIGHT_BYTES` bytes unanswered; the rest
wait in a reactor-side backlog (Twisted never blocks on a write; the window keeps what it
buffers small). Lifecycle: the gateway opens it after its own connection is up and drops it
when that connection is lost; lost alone (xenstored dropped only it), it is opened again
after the gateway's reconnect delays. While it is down (or the transport is the xenbus device,
which is not a socket) the gateway serves the same calls on its own connection. A reply that does
not parse closes it (fail closed: every waiting request fails with `ConnectionLost`), and so
does a request left unanswered for `STALL_AFTER` (oxenstored stopped reading it): its calls
run again on the gateway's connection and a fresh direct connection is opened at once.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from twisted.internet import defer, endpoints, error, protocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from shyped.xenstore import wire
from shyped.xenstore.blocking import Change, Transaction, change_requests
from shyped.xenstore.errors import Again, ConnectionLost, NoEntry, XenstoreError
from shyped.xenstore.gatewayconfig import GatewayConfig
from shyped.xenstore.router import _Batch, _Call, _encode_path
from shyped.xenstore.wire import Op, Perm

T = TypeVar("T")

_log = Logger(namespace="shyped.xenstore")

#: Requests and bytes written and not answered yet (see the module docstring).
MAX_INFLIGHT = 256
MAX_INFLIGHT_BYTES = 64 * 1024
#: Seconds the oldest request may go unanswered before the connection counts as wedged
#: (`DirectConnection`): oxenstored 4.17 reads no more requests from a connection whose
#: writes fired more watch events than a lagging watcher had room for, and never resumes
#: (tests/test_xenstore_direct_stall.py). Its calls then run on the gateway's connection.
STALL_AFTER = 2.0


class _DirectProtocol(protocol.Protocol):
    """Frames requests, matches replies by request id, completes them on the reactor."""

    def __init__(self, on_lost: Callable[[_DirectProtocol, str], None]) -> None:
        self._on_lost = on_lost
        self._buf = bytearray()
        self._pending: dict[int, _Call] = {}
        self._backlog: deque[tuple[_Call, int]] = deque()
        self._inflight_bytes = 0
        self._ids = itertools.count(1)
        self._out: Any = None  # the transport, once connected
        self.closed = False

    def connectionMade(self) -> None:
        self._out = self.transport

    def send(self, calls: Iterable[_Call], tx_id: int = 0) -> None:
        if self.closed:
            for call in calls:
                call.fail(ConnectionLost("direct connection closed", path=call.path))
            return
        self._backlog.extend((call, tx_id) for call in calls)
        self._pump()

    def _pump(self) -> None:
        frames: list[bytes] = []
        while self._backlog and (
            not self._pending
            or (
                len(self._pending) < MAX_INFLIGHT
                and self._inflight_bytes + self._backlog[0][0].size <= MAX_INFLIGHT_BYTES
            )
        ):
            call, tx_id = self._backlog.popleft()
            req_id = next(self._ids) & 0xFFFFFFFF
            self._pending[req_id] = call
            self._inflight_bytes += call.size
            frames.append(wire.pack(call.op, call.payload, req_id, tx_id))
        if frames and self._out is not None:
            self._write(b"".join(frames))

    def _write(self, data: bytes) -> None:
        """Send now when Twisted holds nothing back (one system call, no extra reactor turn
        for the writable event), else queue behind what it holds."""
        out = self._out
        sock = getattr(out, "socket", None)
        if sock is not None and not out.dataBuffer and not out._tempDataBuffer:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                out.write(data)  # let Twisted see the error and close
                return
            data = data[sent:]
        if data:
            out.write(data)

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        done: list[_Call] = []
        try:
            for op, req_id, payload in wire.take_frames(self._buf):
                if op == Op.WATCH_EVENT:
                    continue  # no watch is registered here; ignore anything unsolicited
                call = self._pending.pop(req_id, None)
                if call is None:
                    raise wire.WireError(f"reply to unknown request {req_id} (type {op})")
                self._inflight_bytes -= call.size
                call.reply_op = op
                call.reply_payload = payload
                done.append(call)
        except wire.WireError as exc:
            self._fail_all(f"protocol error on the direct connection: {exc}")
            if self._out is not None:
                self._out.loseConnection()
        self._pump()
        for call in done:
            call.complete()

    def oldest(self) -> int | None:
        """The request id of the oldest request not answered yet (xenstored answers in
        order), or None."""
        return next(iter(self._pending), None)

    def stalled(self, why: str) -> None:
        """Give up on this connection: every waiting call fails with ConnectionLost."""
        self._fail_all(why)
        if self._out is not None:
            self._out.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        why = reason.getErrorMessage() if reason is not None else "closed"
        self._fail_all(f"direct connection lost: {why}")
        self._on_lost(self, why)

    def _fail_all(self, reason: str) -> None:
        self.closed = True
        pending, self._pending = self._pending, {}
        backlog, self._backlog = self._backlog, deque()
        self._inflight_bytes = 0
        for call in [*pending.values(), *(c for c, _ in backlog)]:
            call.fail(ConnectionLost(reason, path=call.path))


class DirectConnection:
    """The reactor-side connection (see the module docstring); one per gateway connection."""

    def __init__(
        self,
        reactor: Any,
        socket_path: str,
        on_lost: Callable[[DirectConnection], object] | None = None,
    ) -> None:
        self.reactor = reactor
        self.socket_path = socket_path
        #: called when the connection is lost without `close` (xenstored dropped it)
        self.on_lost = on_lost
        self._proto: _DirectProtocol | None = None
        #: requests sent on it, round trips its transactions made (tests, benchmarks)
        self.requests = 0
        #: called once when it is dropped as wedged (`STALL_AFTER`)
        self.on_stalled: Callable[[], None] | None = None
        self._watch: Any = None  # the pending stall check (IDelayedCall)
        self._seen: int | None = None  # the oldest request at the last check

    @property
    def up(self) -> bool:
        return self._proto is not None and not self._proto.closed

    def connect(self) -> Deferred[None]:
        """Open the socket; fails with ConnectionLost if xenstored is not there."""
        endpoint = endpoints.UNIXClientEndpoint(  # type: ignore[no-untyped-call]
            self.reactor, self.socket_path, timeout=5
        )
        d: Deferred[Any] = endpoints.connectProtocol(  # type: ignore[no-untyped-call]
            endpoint, _DirectProtocol(self._lost)
        )

        def opened(proto: Any) -> None:
            assert isinstance(proto, _DirectProtocol)
            self._proto = proto
            self._arm()

        def refused(failure: Failure) -> Failure:
            if not isinstance(failure.value, error.ConnectError | OSError):
                return failure
            raise ConnectionLost(f"cannot connect to {self.socket_path}: {failure.value}")

        done: Deferred[None] = d.addCallbacks(opened, refused)
        return done

    def close(self) -> None:
        self._disarm()
        proto, self._proto = self._proto, None
        if proto is not None and proto._out is not None:
            proto._out.loseConnection()

    def _lost(self, proto: _DirectProtocol, _why: str) -> None:
        if proto is self._proto:
            self._proto = None
            self._disarm()
            if self.on_lost is not None:
                self.on_lost(self)

    # -- the stall check: nothing on the hot path, one timer per `STALL_AFTER` ----------

    def _arm(self) -> None:
        self._watch = self.reactor.callLater(STALL_AFTER, self._check)

    def _disarm(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None and watch.active():
            watch.cancel()

    def _check(self) -> None:
        """The oldest request unanswered since the last check? Confirm after the reactor
        has read the socket once more (it may have been busy, replies waiting unread)."""
        self._watch = None
        proto = self._proto
        if proto is None:
            return
        oldest = proto.oldest()
        if oldest is not None and oldest == self._seen:
            self._watch = self.reactor.callLater(0, self._confirm, oldest)
            return
        self._seen = oldest
        self._arm()

    def _confirm(self, oldest: int) -> None:
        self._watch = None
        proto = self._proto
        if proto is None:
            return
        if proto.oldest() != oldest:
            self._seen = proto.oldest()
            self._arm()
            return
        _log.warn(
            "direct xenstore connection: no reply for {s}s (xenstored stopped reading it); "
            "its calls go on the watch connection and a fresh one is opened",
            s=STALL_AFTER,
        )
        self._proto = None
        proto.stalled(f"direct connection stalled: no reply for {STALL_AFTER}s")
        if self.on_stalled is not None:
            self.on_stalled()

    def _send(self, calls: Sequence[_Call], tx_id: int = 0) -> None:
        proto = self._proto
        if proto is None:
            for call in calls:
                call.fail(ConnectionLost("direct connection down", path=call.path))
            return
        self.requests += len(calls)
        proto.send(calls, tx_id)

    def _one(self, op: int, payload: bytes, path: str | None, tx_id: int = 0) -> Deferred[Any]:
        call = _Call(op, payload, path, bytes)
        assert call.deferred is not None
        self._send((call,), tx_id)
        return call.deferred

    # -- requests ------------------------------------------------------------------------

    def read_nodes(
        self, paths: Sequence[str], perm_paths: Sequence[str]
    ) -> Deferred[tuple[dict[str, bytes | None], dict[str, tuple[Perm, ...] | None]]]:
        """Values of `paths` and permissions of `perm_paths`, all in one send (pipelined, not
        atomic); None where a node does not exist. Any other error fails the lot."""
        try:
            raw = {p: wire.path_payload(_encode_path(p)) for p in [*paths, *perm_paths]}
        except (ValueError, TypeError) as exc:
            return defer.fail(exc)
        n = len(paths)

        def split(_keys: list[str], got: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            return dict(zip(paths, got[:n], strict=True)), dict(
                zip(perm_paths, got[n:], strict=True)
            )

        # One batch (one Deferred) for both kinds: no gatherResults on the hot path.
        batch = _Batch([*paths, *perm_paths], split)
        calls = [_Call(Op.READ, raw[p], p, bytes, batch, i) for i, p in enumerate(paths)]
        calls.extend(
            _Call(Op.GET_PERMS, raw[p], p, wire.perms, batch, n + i)
            for i, p in enumerate(perm_paths)
        )
        self._send(calls)
        result: Deferred[tuple[dict[str, bytes | None], dict[str, tuple[Perm, ...] | None]]]
        result = batch.deferred
        return result

    def apply_if(
        self,
        path: str | None,
        expect: bytes,
        changes: Sequence[Change],
        *,
        attempts: int = 16,
        backoff: tuple[float, float] = (0.001, 0.1),
    ) -> Deferred[bool]:
        """`Transaction.apply_if` on the reactor: make `changes` in one transaction if `path`
        holds `expect` (None: unconditionally); False (nothing written) if it does not.
        START, the check and the changes pipelined, END: three round trips. Retried on EAGAIN
        with jittered exponential backoff, then `Again`."""
        try:
            requests = change_requests(path, changes)
        except (ValueError, TypeError) as exc:
            return defer.fail(exc)
        return Deferred.fromCoroutine(self._apply_if(path, expect, requests, attempts, backoff))

    async def _apply_if(
        self,
        path: str | None,
        expect: bytes,
        requests: list[tuple[int, bytes, str]],
        attempts: int,
        backoff: tuple[float, float],
    ) -> bool:
        delay, cap = backoff
        for attempt in range(1, attempts + 1):
            try:
                tx_id = wire.transaction_id(await self._one(Op.TRANSACTION_START, wire.NUL, None))
            except Again:
                tx_id = 0
            if tx_id:
                calls = [
                    _Call(op, payload, where, bytes if op == Op.READ else wire.ack)
                    for op, payload, where in requests
                ]
                self._send(calls, tx_id)
                got = await defer.DeferredList(
                    [c.deferred for c in calls if c.deferred is not None], consumeErrors=True
                )
                results: list[Any] = [r if ok else r.value for ok, r in got]
                lost = next((r for r in results if isinstance(r, ConnectionLost)), None)
                if lost is not None:
                    raise lost
                wanted = True
                if path is not None:
                    seen = results.pop(0)
                    if isinstance(seen, XenstoreError) and not isinstance(seen, NoEntry):
                        await self._end(tx_id, commit=False)
                        raise seen
                    wanted = seen == expect
                failed = next((r for r in results if isinstance(r, Exception)), None)
                if not wanted or failed is not None:
                    await self._end(tx_id, commit=False)
                    if failed is not None and wanted:
                        raise failed
                    return False
                if await self._end(tx_id, commit=True):
                    return True
            if attempt < attempts:
                pause = random.uniform(delay / 2, delay)
                await _sleep(self.reactor, pause)
                delay = min(delay * 2, cap)
        raise Again("EAGAIN", detail=f"transaction still conflicting after {attempts} attempts")

    async def _end(self, tx_id: int, *, commit: bool) -> bool:
        """End a transaction; False if the commit conflicted (EAGAIN). An abort that fails
        (other than by losing the connection) is ignored: xenstored drops it with the check."""
        try:
            await self._one(Op.TRANSACTION_END, wire.transaction_end_payload(commit), None, tx_id)
        except Again:
            return False
        except ConnectionLost:
            raise
        except XenstoreError:
            if commit:
                raise
        return True


def _sleep(reactor: Any, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def _first_error(failure: Failure) -> Failure:
    if isinstance(failure.value, defer.FirstError):
        return failure.value.subFailure
    return failure


class DirectRoutes:
    """The gateway's side of the direct connection (`XenstoreGateway` inherits it): opens it
    beside each connection of its own, drops it with that connection, and sends the
    latency-critical calls on it while it is up, on the gateway's connection otherwise."""

    _direct: DirectConnection | None = None
    _direct_retry: Any = None
    _direct_delay = 0.0
    #: False sends the calls on the gateway's own connection even while the direct one is up
    #: (benchmarks compare both in one run: ``bench_daemon.py --ab-direct``).
    prefer_direct = True

    # what the gateway provides
    config: GatewayConfig
    reactor: Any
    _router: Any
    _state: str

    def read_many(self, paths: Iterable[str]) -> Deferred[dict[str, bytes | None]]:
        raise NotImplementedError

    def get_perms(self, path: str) -> Deferred[tuple[Perm, ...]]:
        raise NotImplementedError

    def read(self, path: str) -> Deferred[bytes]:
        raise NotImplementedError

    def transaction(self, fn: Callable[[Transaction], T]) -> Deferred[T]:
        raise NotImplementedError

    def _open_direct(self) -> Deferred[None]:
        """Open the watch-free reactor connection beside the gateway's own. Never fails the
        connect: without it the same calls go on the gateway's connection."""
        self._drop_direct()
        if not self.config.direct or self.config.transport != "unix":
            return defer.succeed(None)
        direct = DirectConnection(self.reactor, self.config.socket_path, self._direct_down)

        def up(_: None) -> None:
            if self._router is None or self._state == "closed":
                direct.close()
            else:
                self._direct = direct
                self._direct_delay = 0.0
                direct.on_stalled = lambda: self._reopen_stalled(direct)

        def down(failure: Failure) -> None:
            _log.warn(
                "no second xenstore connection ({f}): reads and label writes share the "
                "watch connection",
                f=failure.getErrorMessage(),
            )
            self._direct_down(direct)

        return direct.connect().addCallbacks(up, down)

    def _direct_down(self, direct: DirectConnection) -> None:
        """The direct connection alone is lost (or would not open) while the gateway's own
        is up: open it again after a capped, jittered, growing delay (the gateway's reconnect
        settings). No reconnect of the gateway follows, so nothing else would."""
        if direct is not self._direct and self._direct is not None:
            return  # an older one
        if self._router is None or self._state == "closed" or self._direct_retry is not None:
            return  # the gateway's reconnect opens it again with its own connection
        cfg = self.config
        self._direct_delay = min(
            max(self._direct_delay * cfg.reconnect_factor, cfg.reconnect_initial),
            cfg.reconnect_max,
        )
        delay = random.uniform(self._direct_delay / 2, self._direct_delay)
        self._direct_retry = self.reactor.callLater(delay, self._reopen_direct)

    def _reopen_direct(self) -> None:
        self._direct_retry = None
        if self._router is not None and self._state != "closed":
            self._open_direct()

    def _reopen_stalled(self, wedged: DirectConnection) -> None:
        """A fresh direct connection for one dropped as wedged, while the gateway is up."""
        if self._direct is wedged and self._router is not None and self._state != "closed":
            self._open_direct()

    def _drop_direct(self) -> None:
        retry, self._direct_retry = self._direct_retry, None
        if retry is not None and retry.active():
            retry.cancel()
        direct, self._direct = self._direct, None
        if direct is not None:
            direct.close()

    @property
    def direct(self) -> bool:
        """True while `read_nodes` and `apply_if` go on the second connection: their replies
        then say nothing about which watch events have been dispatched (see `sync`)."""
        return self.prefer_direct and self._direct is not None and self._direct.up

    def read_nodes(
        self, paths: Iterable[str], perm_paths: Iterable[str]
    ) -> Deferred[tuple[dict[str, bytes | None], dict[str, tuple[Perm, ...] | None]]]:
        """Values of `paths` and permissions of `perm_paths` in about one round trip
        (pipelined, not atomic); None where a node is absent."""
        wanted = list(dict.fromkeys(paths))
        perm_wanted = list(dict.fromkeys(perm_paths))
        if self.direct:
            assert self._direct is not None
            d = self._direct.read_nodes(wanted, perm_wanted)
            return d.addErrback(self._direct_lost, lambda: self._read_nodes(wanted, perm_wanted))
        return self._read_nodes(wanted, perm_wanted)

    def _direct_lost(self, failure: Failure, again: Callable[[], Deferred[T]]) -> Any:
        """A call the direct connection lost (only it, or both) runs again on the gateway's
        own connection while that is up: no reconnect (and no reconcile) would follow the
        loss of the direct connection alone, so a batch's reads and a label write must not
        be dropped with it. The label write may then run twice: it is idempotent."""
        if isinstance(failure.value, ConnectionLost) and self._router is not None:
            _log.warn("direct xenstore connection lost: {f}", f=failure.getErrorMessage())
            return again()
        return failure

    def _read_nodes(
        self, wanted: list[str], perm_wanted: list[str]
    ) -> Deferred[tuple[dict[str, bytes | None], dict[str, tuple[Perm, ...] | None]]]:
        values = self.read_many(wanted)
        perms = [self.get_perms(p).addErrback(_absent) for p in perm_wanted]
        both: Deferred[list[Any]] = defer.gatherResults([values, *perms], consumeErrors=True)
        return both.addCallbacks(
            lambda got: (got[0], dict(zip(perm_wanted, got[1:], strict=True))), _first_error
        )

    def sync(self) -> Deferred[None]:
        """Fires once the callbacks of every watch event xenstored sent before this request
        have run: a reply on the watch connection comes after them."""
        return self.read("/").addCallback(lambda _: None)

    def apply_if(
        self, path: str | None, expect: bytes, changes: Sequence[Change]
    ) -> Deferred[bool]:
        """`Transaction.apply_if` in a transaction of its own, retried on EAGAIN: on the
        reactor over the direct connection when it is up (three round trips, no thread),
        else on a worker thread."""
        cfg = self.config

        def on_worker() -> Deferred[bool]:
            return self.transaction(lambda tx: tx.apply_if(path, expect, changes))

        if self.direct:
            assert self._direct is not None
            d = self._direct.apply_if(
                path,
                expect,
                changes,
                attempts=cfg.tx_max_attempts,
                backoff=(cfg.tx_backoff_initial, cfg.tx_backoff_max),
            )
            return d.addErrback(self._direct_lost, on_worker)
        return on_worker()


def _absent(failure: Failure) -> Failure | None:
    """No permissions for a node removed before the read."""
    return None if isinstance(failure.value, NoEntry) else failure
