"""The daemon's only door to xenstored: pyxs's connection and reader thread, driven from Twisted.

Shape (one connection, three kinds of thread):

* **Reactor thread** issues single requests (``read``, ``write``, ``read_many``…).  It writes
  the framed request straight to the socket (one ``send``; ``read_many`` sends all its
  requests in one) and returns a Deferred; there is no
  hop through a worker, so a request costs what a pyxs round trip costs plus one wake-up of
  the reactor.  Requests beyond a small in-flight window (count *and* bytes) wait in a
  reactor-side backlog, which keeps everything ever written and not yet answered well below
  the socket's send buffer: a ``send`` from the reactor cannot block even if xenstored stops
  reading.
* **Reader thread** (pyxs's ``Router`` thread, see ``shyped.xenstore.router._Router``) reads
  the socket in large chunks, wakes blocked worker requests directly, and hands completed
  reactor requests and watch events to the reactor through one inbox.  The inbox keeps at most one
  ``callFromThread`` outstanding: while the reactor has not drained it, further replies and
  events just accumulate, so a flood costs one reactor wake-up per drain, not per event.
* **Worker threads** (a Twisted ``ThreadPool``, ``workers`` of them) run the blocking parts:
  connecting, :meth:`XenstoreGateway.transaction` functions (retried on EAGAIN with jittered
  exponential backoff, as libxl retries ``xs_transaction_end``), and
  :meth:`XenstoreGateway.snapshot`, which walks a subtree inside a transaction issuing the
  DIRECTORY/READ/GET_PERMS requests of a whole tree level at once (round trips ∝ depth, not
  node count).

Watch events: see :mod:`shyped.xenstore.events` for the bound, the coalescing and the
round-robin lanes (one per watch and first path component below the watched path, i.e. per
domain under ``/local/domain``).  Callbacks run on the reactor thread, at most
``max_events_per_turn`` per reactor turn (then the reactor serves its other work before the
next slice).  Events are dispatched before the replies that arrived with or after them, so
when a request's Deferred fires, the callbacks of events xenstored sent before that reply have
run (unless more than one slice was pending).  A watch whose events were dropped gets
``on_overflow(path)``: re-read that subtree.

Connection loss (xenstored exits, restarts, the socket errors): every waiting request fails
with :class:`ConnectionLost` at once, ``on_connection_lost`` is called, and the gateway
reconnects with capped, jittered exponential backoff from a worker thread.  Once connected
it re-registers every watch (which fires each once, as xenstored does for any new watch) and
then calls ``on_reconnected``: the daemon reconciles there (``snapshot``), knowing that any
change after the re-registration produces an event.  Requests made while disconnected fail
at once with ``ConnectionLost``; nothing is queued for later, the reconcile covers it.

Why not ``pyxs.Client``: its router leaves a request waiting forever when the socket dies
(the reply variable is never set), its request ids are not thread-safe and overflow the
32-bit header field, its ``Monitor`` queue is unbounded, and ``execute_command`` refuses
non-ASCII values and strips trailing NULs from values; its one ``send`` per header and one
per payload and its path check (``posixpath.abspath`` per call) cost more than the request on
a loaded reactor.  We keep pyxs's connections (``UnixSocketConnection`` /
``XenBusConnection``) and its router thread scaffolding (terminator pair, send lock), and
frame requests with :mod:`shyped.xenstore.wire`.

Modules: this one holds `XenstoreGateway` (connection lifecycle, the reactor-side request
API); `shyped.xenstore.watches` its watches (registration, dispatch, overflow);
`shyped.xenstore.router` the reader thread, framing and inbox; `shyped.xenstore.blocking`
the worker-thread requests, transactions and snapshots; `shyped.xenstore.gatewayconfig` the
configuration, results and counters; `shyped.xenstore.direct` the second connection.

Values are ``bytes`` both ways: anything a guest wrote is returned verbatim for a strict parser
to decode.  Paths are ``str`` (xenstored only stores ASCII path characters).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import pyxs
from pyxs.connection import UnixSocketConnection, XenBusConnection
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from shyped.xenstore import listing, wire
from shyped.xenstore.blocking import (
    Transaction,
    _run_transaction,
)
from shyped.xenstore.direct import DirectConnection, DirectRoutes
from shyped.xenstore.errors import (
    ConnectionLost,
)
from shyped.xenstore.gatewayconfig import (
    GatewayConfig,
    GatewayStats,
    Snapshot,
    _Reactor,
)
from shyped.xenstore.router import (
    _Batch,
    _Call,
    _check_value,
    _encode_path,
    _Inbox,
    _Router,
)
from shyped.xenstore.snapshot import Scan, _check_root, _run_scan, _run_snapshot
from shyped.xenstore.watches import WatchRoutes, _WatchSpec
from shyped.xenstore.wire import Op, Perm

T = TypeVar("T")

_log = Logger(namespace="shyped.xenstore")


# -- the gateway -----------------------------------------------------------------------------


class XenstoreGateway(WatchRoutes, DirectRoutes):
    """One connection to xenstored, used from the reactor thread.  See the module docstring.

    Every method is called on the reactor thread; every Deferred fires there, and every
    callback (watch events, overflow, connection lost/reconnected) runs there.
    """

    def __init__(
        self,
        config: GatewayConfig | None = None,
        *,
        reactor: _Reactor | None = None,
        on_connection_lost: Callable[[ConnectionLost], object] | None = None,
        on_reconnected: Callable[[], object] | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        assert reactor is not None
        self.config = config or GatewayConfig()
        self.reactor: _Reactor = reactor
        #: Called when an established connection is lost (before reconnecting starts).
        self.on_connection_lost = on_connection_lost
        #: Called after a reconnect, once every watch is registered again: reconcile here.
        self.on_reconnected = on_reconnected
        #: Close at the reactor's shutdown by itself; False when the owner closes it in its
        #: own order (the daemon finishes its reads first, `shyped.service.daemon`).
        self.close_at_shutdown = True
        self._inbox = _Inbox(reactor, self._drain, self.config.max_pending_events)
        self._pool = ThreadPool(minthreads=0, maxthreads=self.config.workers, name="xenstore")
        self._router: _Router | None = None
        self._state = "idle"  # idle, connecting, connected, reconnecting, closed
        self._watches: dict[bytes, _WatchSpec] = {}
        self._backlog: deque[_Call] = deque()
        self._inflight = 0
        self._inflight_bytes = 0
        self._requests = 0
        self._reconnects = 0
        self._reconnect_attempts = 0
        self._delay = self.config.reconnect_initial
        self._retry_call: Any = None
        self._shutdown_trigger: Any = None
        self._direct: DirectConnection | None = None

    # -- state ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is up and every watch is registered on it."""
        return self._state == "connected" and self._router is not None

    @property
    def reconnecting(self) -> bool:
        """True while the connection is lost and being opened again."""
        return self._state == "reconnecting"

    @property
    def reconnects(self) -> int:
        """Successful reconnections since connect()."""
        return self._reconnects

    def stats(self) -> GatewayStats:
        return GatewayStats(
            connected=self.connected,
            reconnects=self._reconnects,
            reconnect_attempts=self._reconnect_attempts,
            requests=self._requests,
            inflight=self._inflight,
            backlog=len(self._backlog),
            events=self._inbox.stats(),
        )

    # -- lifecycle -----------------------------------------------------------------------

    def connect(self) -> Deferred[None]:
        """Open the connection and register any watches added before; fails with
        ConnectionLost if xenstored is not there (no retry: the caller decides)."""
        if self._state != "idle":
            return defer.fail(RuntimeError(f"connect() while {self._state}"))
        self._state = "connecting"
        if not self._pool.started:
            self._pool.start()
        if self._shutdown_trigger is None and self.close_at_shutdown:
            self._shutdown_trigger = self.reactor.addSystemEventTrigger(
                "before", "shutdown", self._close_on_shutdown
            )
        d = self._open_and_arm()

        def connected(_: None) -> None:
            if self._state == "connecting":
                self._state = "connected"

        def failed(failure: Failure) -> Failure:
            if self._state == "connecting":
                self._state = "idle"
            return failure

        d.addCallbacks(connected, failed)
        return d

    def close(self) -> Deferred[None]:
        """Stop reconnecting, drop the connection (outstanding requests fail with
        ConnectionLost) and stop the worker threads."""
        if self._state == "closed":
            return defer.succeed(None)
        self._state = "closed"
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if self._shutdown_trigger is not None:
            self.reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        router, self._router = self._router, None
        self._fail_backlog("gateway closed")
        self._drop_direct()
        pool = self._pool

        def stop() -> None:
            if router is not None:
                router.stop()
                router.thread.join(5.0)
            if pool.started:
                pool.stop()

        return threads.deferToThreadPool(
            self.reactor,  # type: ignore[arg-type]
            self.reactor.getThreadPool(),
            stop,
        )

    def _close_on_shutdown(self) -> Deferred[None]:
        self._shutdown_trigger = None
        return self.close()

    def _open(self) -> _Router:
        """Worker thread: connect a new router (pyxs connects in the calling thread)."""
        cfg = self.config
        if cfg.transport == "xenbus":
            connection: Any = XenBusConnection(cfg.xenbus_path)
        else:
            connection = UnixSocketConnection(cfg.socket_path)
        router = _Router(connection, self._inbox, self._router_closed)
        try:
            router.start()
        except (pyxs.ConnectionError, OSError) as exc:
            if not router.thread.is_alive():
                router.r_terminator.close()
                router.w_terminator.close()
            raise ConnectionLost(f"cannot connect to {connection.path}: {exc}") from None
        return router

    def _open_and_arm(self) -> Deferred[None]:
        d: Deferred[_Router] = threads.deferToThreadPool(
            self.reactor,  # type: ignore[arg-type]
            self._pool,
            self._open,
        )
        return d.addCallback(self._install)

    def _install(self, router: _Router) -> Deferred[None]:
        if self._state == "closed":
            router.stop()
            raise ConnectionLost("gateway closed while connecting")
        if router.closed:
            raise ConnectionLost("connection dropped as it opened")
        self._router = router
        arms = [self._arm(spec) for spec in list(self._watches.values())]
        arms.append(self._open_direct())
        done: Deferred[list[None]] = defer.gatherResults(arms, consumeErrors=True)
        return done.addCallbacks(lambda _: None, _first_error)

    def _router_closed(self, router: _Router, reason: str) -> None:
        """Reader thread: its connection is gone."""
        self.reactor.callFromThread(self._connection_lost, router, reason)

    def _connection_lost(self, router: _Router, reason: str) -> None:
        if router is not self._router:
            return
        self._router = None
        self._fail_backlog(reason)
        self._drop_direct()
        if self._state != "connected":
            return  # connecting or reconnecting: that attempt's failure path takes over
        self._state = "reconnecting"
        _log.warn("xenstore connection lost: {reason}; reconnecting", reason=reason)
        if self.on_connection_lost is not None:
            try:
                self.on_connection_lost(ConnectionLost(reason))
            except Exception:
                _log.failure("on_connection_lost raised")
        self._delay = self.config.reconnect_initial
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        delay = random.uniform(self._delay / 2, self._delay)
        self._delay = min(self._delay * self.config.reconnect_factor, self.config.reconnect_max)
        self._retry_call = self.reactor.callLater(delay, self._reconnect)

    def _reconnect(self) -> None:
        self._retry_call = None
        if self._state != "reconnecting":
            return
        self._reconnect_attempts += 1
        d = self._open_and_arm()

        def up(_: None) -> None:
            if self._state != "reconnecting" or self._router is None:
                return
            self._state = "connected"
            self._reconnects += 1
            _log.info("xenstore reconnected (reconnect #{n})", n=self._reconnects)
            if self.on_reconnected is not None:
                try:
                    self.on_reconnected()
                except Exception:
                    _log.failure("on_reconnected raised")

        def down(failure: Failure) -> None:
            if self._state != "reconnecting":
                return
            if self._router is not None:  # connected but a watch failed: start over
                router, self._router = self._router, None
                router.stop()
            _log.debug("xenstore reconnect failed: {f}", f=failure.getErrorMessage())
            self._schedule_reconnect()

        d.addCallbacks(up, down)

    # -- the reactor side of requests ----------------------------------------------------

    def _request(
        self, op: int, payload: bytes, path: str | None, decode: Callable[[bytes], T]
    ) -> Deferred[T]:
        call = _Call(op, payload, path, decode)
        deferred = call.deferred
        assert deferred is not None
        self._enqueue((call,))
        return deferred

    def _enqueue(self, calls: Iterable[_Call]) -> None:
        """Queue calls behind any backlog and send what the window allows, in one write."""
        if self._router is None:
            for call in calls:
                call.fail(ConnectionLost("not connected", path=call.path))
            return
        before = len(self._backlog)
        self._backlog.extend(calls)
        self._requests += len(self._backlog) - before
        self._pump()

    def _pump(self) -> None:
        backlog = self._backlog
        if not backlog:
            return
        max_count, max_bytes = self.config.max_inflight, self.config.max_inflight_bytes
        batch: list[_Call] = []
        size = 0
        while backlog and (
            (self._inflight == 0 and not batch)
            or (
                self._inflight + len(batch) < max_count
                and self._inflight_bytes + size + backlog[0].size <= max_bytes
            )
        ):
            call = backlog.popleft()
            batch.append(call)
            size += call.size
        if not batch:
            return
        router = self._router
        try:
            if router is None:
                raise ConnectionLost("not connected")
            router.submit(batch, 0)
        except ConnectionLost as exc:
            for call in batch:
                call.fail(ConnectionLost(exc.detail, path=call.path))
            return
        self._inflight += len(batch)
        self._inflight_bytes += size

    def _fail_backlog(self, reason: str) -> None:
        backlog, self._backlog = self._backlog, deque()
        for call in backlog:
            call.fail(ConnectionLost(reason, path=call.path))

    def _drain(self) -> None:
        """Reactor: complete replies, refill the window, run watch callbacks (one slice)."""
        calls, batch, more = self._inbox.take(self.config.max_events_per_turn)
        for call in calls:
            self._inflight -= 1
            self._inflight_bytes -= call.size
        self._pump()
        # Events first: they arrived before (or with) these replies, so a reply's callback
        # sees the effects of the events xenstored sent ahead of it (up to one slice).
        if batch:
            self._dispatch(batch)
        for call in calls:
            call.complete()
        if more:
            self.reactor.callLater(0, self._drain)

    # -- single requests (reactor thread; Deferreds) -------------------------------------

    def _path_request(self, op: int, path: str, decode: Callable[[bytes], T]) -> Deferred[T]:
        try:
            raw = _encode_path(path)
        except (ValueError, TypeError) as exc:
            return defer.fail(exc)
        return self._request(op, wire.path_payload(raw), path, decode)

    def read(self, path: str) -> Deferred[bytes]:
        """The node's value (bytes, verbatim); NoEntry if absent."""
        return self._path_request(Op.READ, path, bytes)

    def read_many(self, paths: Iterable[str]) -> Deferred[dict[str, bytes | None]]:
        """Several values in about one round trip (pipelined, not atomic); None if absent."""
        wanted = list(dict.fromkeys(paths))
        try:
            payloads = [wire.path_payload(_encode_path(path)) for path in wanted]
        except (ValueError, TypeError) as exc:
            return defer.fail(exc)
        batch = _Batch(wanted)
        self._enqueue(
            _Call(Op.READ, payload, path, bytes, batch, index)
            for index, (path, payload) in enumerate(zip(wanted, payloads, strict=True))
        )
        return batch.deferred

    def directory(self, path: str) -> Deferred[tuple[str, ...]]:
        """Child names; NoEntry if absent. A list longer than a message is read in parts
        where xenstored asks for that (E2BIG; `shyped.xenstore.listing`)."""
        first = self._path_request(Op.DIRECTORY, path, wire.children)
        return listing.directory_deferred(
            first, lambda op, p: self._request(op, p, path, bytes), path
        )

    def get_perms(self, path: str) -> Deferred[tuple[Perm, ...]]:
        """The permission list, owner first."""
        return self._path_request(Op.GET_PERMS, path, wire.perms)

    def write(self, path: str, value: bytes) -> Deferred[None]:
        """Create or overwrite a node (missing parents are created)."""
        try:
            payload = wire.write_payload(_encode_path(path), _check_value(value))
        except (ValueError, TypeError) as exc:
            return defer.fail(exc)
        return self._request(Op.WRITE, payload, path, wire.ack)

    def mkdir(self, path: str) -> Deferred[None]:
        return self._path_request(Op.MKDIR, path, wire.ack)

    def rm(self, path: str) -> Deferred[None]:
        """Remove a node and everything below it."""
        return self._path_request(Op.RM, path, wire.ack)

    def set_perms(self, path: str, perms: Sequence[Perm]) -> Deferred[None]:
        try:
            payload = wire.set_perms_payload(_encode_path(path), tuple(perms))
        except (ValueError, TypeError) as exc:
            return defer.fail(exc)
        return self._request(Op.SET_PERMS, payload, path, wire.ack)

    # -- worker-thread operations --------------------------------------------------------

    def _in_worker(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        router = self._router
        if router is None:
            return defer.fail(ConnectionLost("not connected"))
        return threads.deferToThreadPool(
            self.reactor,  # type: ignore[arg-type]
            self._pool,
            fn,
            router,
            self.config,
            *args,
        )

    def transaction(
        self, fn: Callable[[Transaction], T], *, max_attempts: int | None = None
    ) -> Deferred[T]:
        """Run ``fn(tx)`` on a worker thread inside a transaction and commit; on EAGAIN run
        it again (jittered exponential backoff) up to ``max_attempts``, then fail with Again.

        ``fn`` must be a pure function of what it reads through ``tx``: it may run several
        times, and it must not touch reactor-side state.  If it raises, the transaction is
        aborted and the Deferred fails with that exception.
        """
        attempts = max_attempts or self.config.tx_max_attempts
        return self._in_worker(_run_transaction, fn, attempts)

    def snapshot(self, root: str, *, with_perms: bool = True) -> Deferred[Snapshot]:
        """Every node under ``root`` (value, children, optionally permissions), read in one
        transaction on a worker thread; an absent root gives an empty snapshot."""
        bad = _check_root(root)
        return defer.fail(bad) if bad else self._in_worker(_run_snapshot, root, with_perms)

    def scan(
        self, root: str, prune: Callable[[str], bool], perms_for: Callable[[str], bool]
    ) -> Deferred[Scan]:
        """`snapshot`, compactly: ``(value, perms)`` per node, permissions only where
        ``perms_for(path)``, no subtree where ``prune(path)`` (`shyped.xenstore.snapshot`)."""
        bad = _check_root(root)
        return defer.fail(bad) if bad else self._in_worker(_run_scan, root, prune, perms_for)


def _first_error(failure: Failure) -> Failure:
    if isinstance(failure.value, defer.FirstError):
        return failure.value.subFailure
    return failure
