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
* **Reader thread** (pyxs's ``Router`` thread, see :class:`_Router`) reads the socket in large
  chunks, wakes blocked worker requests directly, and hands completed reactor requests and
  watch events to the reactor through one inbox.  The inbox keeps at most one
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

Values are ``bytes`` both ways: anything a guest wrote is returned verbatim for a strict parser
to decode.  Paths are ``str`` (xenstored only stores ASCII path characters).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import attrs
import pyxs
from pyxs.connection import UnixSocketConnection, XenBusConnection
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from shyped.xenstore import wire
from shyped.xenstore.errors import (
    Again,
    ConnectionLost,
    NoEntry,
    XenstoreError,
    from_errno_name,
)
from shyped.xenstore.events import EventBatch, EventQueue, EventQueueStats, RawEvent
from shyped.xenstore.wire import Op, Perm

T = TypeVar("T")


class XenstoreSettings(Protocol):
    """What `GatewayConfig.from_xenstore_config` reads: the daemon's ``[xenstore]`` table
    (:class:`shyped.service.config.XenstoreConfig`), which lives above this layer."""

    @property
    def transport(self) -> str: ...
    @property
    def socket(self) -> os.PathLike[str]: ...
    @property
    def reconnect_max_backoff(self) -> float: ...


_log = Logger(namespace="shyped.xenstore")

#: Per-read chunk: many replies/events per system call under load, yet few enough (~200 events)
#: that parsing one chunk holds the GIL well under the 5 ms switch interval the reactor
#: thread would otherwise wait when it wakes up during a flood.
_READ_CHUNK = 8192


class _Reactor(Protocol):
    """What the gateway uses of a Twisted reactor."""

    def callLater(self, delay: float, f: Callable[..., Any], *a: Any, **kw: Any) -> Any: ...

    def callFromThread(self, f: Callable[..., Any], *a: Any, **kw: Any) -> None: ...

    def addSystemEventTrigger(
        self, phase: str, event: str, f: Callable[..., Any], *a: Any, **kw: Any
    ) -> Any: ...

    def removeSystemEventTrigger(self, trigger_id: Any) -> None: ...

    def getThreadPool(self) -> ThreadPool: ...


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.frozen
class GatewayConfig:
    """How to reach xenstored and the gateway's bounds; defaults suit a real dom0."""

    #: ``unix``: xenstored's socket (dom0 toolstack); ``xenbus``: the kernel's xenbus device.
    transport: str = attrs.field(default="unix", validator=attrs.validators.in_(("unix", "xenbus")))
    socket_path: str = "/var/run/xenstored/socket"
    #: None: pyxs's platform default (``/dev/xen/xenbus``, else ``/proc/xen/xenbus``).
    xenbus_path: str | None = None
    #: Reconnect backoff: first delay, growth factor, cap (seconds); each delay is jittered
    #: to a uniform draw in [delay/2, delay] so restarted daemons do not reconnect in step.
    reconnect_initial: float = attrs.field(default=0.05, validator=_positive)
    reconnect_factor: float = attrs.field(default=2.0, validator=_positive)
    reconnect_max: float = attrs.field(default=30.0, validator=_positive)
    #: Distinct watch events pending before new ones are dropped and their watch overflowed.
    max_pending_events: int = attrs.field(default=10_000, validator=_positive)
    #: Watch callbacks run per reactor turn before yielding to other reactor work.
    max_events_per_turn: int = attrs.field(default=1_000, validator=_positive)
    #: Window of unanswered requests per sender (reactor; each worker): count and bytes.
    max_inflight: int = attrs.field(default=32, validator=_positive)
    max_inflight_bytes: int = attrs.field(default=16_384, validator=_positive)
    #: Transaction attempts before giving up with Again; backoff between attempts.
    tx_max_attempts: int = attrs.field(default=16, validator=_positive)
    tx_backoff_initial: float = attrs.field(default=0.001, validator=_positive)
    tx_backoff_max: float = attrs.field(default=0.1, validator=_positive)
    #: Snapshot attempts before returning an inconsistent (but complete) walk.
    snapshot_attempts: int = attrs.field(default=4, validator=_positive)
    workers: int = attrs.field(default=2, validator=_positive)

    @classmethod
    def from_xenstore_config(cls, config: XenstoreSettings, **overrides: Any) -> GatewayConfig:
        """From the daemon's ``[xenstore]`` table
        (:class:`shyped.service.config.XenstoreConfig`)."""
        socket_path = str(config.socket)
        values: dict[str, Any] = {
            "transport": config.transport,
            "socket_path": socket_path,
            "reconnect_max": config.reconnect_max_backoff,
        }
        values.update(overrides)
        return cls(**values)


# -- results ---------------------------------------------------------------------------------


@attrs.frozen
class Node:
    """One node of a :class:`Snapshot`."""

    value: bytes
    children: tuple[str, ...]
    #: None when the snapshot was taken without permissions.
    perms: tuple[Perm, ...] | None


@attrs.frozen
class Snapshot:
    """A subtree read in one transaction: ``nodes`` maps absolute path to node, parents first.

    ``consistent`` is False when every attempt's commit reported a concurrent change (a
    subtree under heavy writes); the walk is then complete but may mix moments.  Watches armed
    before the walk deliver whatever changed, so a reconcile converges either way.
    """

    root: str
    nodes: Mapping[str, Node]
    consistent: bool
    attempts: int


@attrs.frozen
class GatewayStats:
    """Counters for metrics."""

    connected: bool
    reconnects: int
    reconnect_attempts: int
    requests: int
    inflight: int
    backlog: int
    events: EventQueueStats


# -- wire plumbing ---------------------------------------------------------------------------


def _encode_path(path: str, *, watch: bool = False) -> bytes:
    """Validate a path the way xenstored will and encode it (ValueError if it would refuse)."""
    if not isinstance(path, str):
        raise TypeError(f"xenstore paths are str, got {type(path).__name__}")
    try:
        raw = path.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"invalid xenstore path {path!r}") from None
    return wire.check_path(raw, watch=watch)


def _check_value(value: bytes) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"xenstore values are bytes, got {type(value).__name__}")
    return value


def _join(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


class _Pending:
    """A request written to xenstored and not answered yet; filled in by the reader thread."""

    __slots__ = ("lost", "op", "path", "payload", "reply_op", "reply_payload", "size")

    def __init__(self, op: int, payload: bytes, path: str | None) -> None:
        self.op = op
        self.payload = payload
        self.path = path
        self.size = len(payload) + wire.HEADER.size
        self.reply_op = -1
        self.reply_payload = b""
        self.lost: str | None = None

    def result(self) -> bytes:
        """The reply payload, or the error it carries, as a gateway exception."""
        if self.lost is not None:
            raise ConnectionLost(self.lost, path=self.path)
        if self.reply_op == Op.ERROR:
            try:
                name = wire.error_name(self.reply_payload)
            except wire.WireError as exc:
                raise XenstoreError("EPROTO", self.path, str(exc)) from None
            raise from_errno_name(name, self.path)
        if self.reply_op != self.op:
            raise XenstoreError("EPROTO", self.path, f"reply type {self.reply_op} to {self.op}")
        return self.reply_payload


class _Waiter(_Pending):
    """A request whose sender (a worker thread) blocks until the reader wakes it."""

    __slots__ = ("_done",)

    def __init__(self, op: int, payload: bytes, path: str | None) -> None:
        super().__init__(op, payload, path)
        self._done = threading.Event()

    def wake(self) -> None:
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait_done(self) -> None:
        self._done.wait()

    def wait(self) -> bytes:
        self._done.wait()
        return self.result()


class _Call(_Pending):
    """A request from the reactor: completed there, when the inbox is drained.

    Either it resolves its own Deferred, or it is one slot of a :class:`_Batch`.
    """

    __slots__ = ("batch", "decode", "deferred", "index")

    def __init__(
        self,
        op: int,
        payload: bytes,
        path: str | None,
        decode: Callable[[bytes], Any],
        batch: _Batch | None = None,
        index: int = 0,
    ) -> None:
        super().__init__(op, payload, path)
        self.decode = decode
        self.batch = batch
        self.index = index
        self.deferred: Deferred[Any] | None = None if batch is not None else Deferred()

    def complete(self) -> None:
        value: Any = None
        error: XenstoreError | None = None
        try:
            value = self.decode(self.result())
        except wire.WireError as exc:
            error = XenstoreError("EPROTO", self.path, str(exc))
        except XenstoreError as exc:
            error = exc
        if self.batch is not None:
            self.batch.settle(self.index, value, error)
        elif self.deferred is not None:
            if error is None:
                self.deferred.callback(value)
            else:
                self.deferred.errback(error)

    def fail(self, error: XenstoreError) -> None:
        if self.batch is not None:
            self.batch.settle(self.index, None, error)
        elif self.deferred is not None:
            self.deferred.errback(error)


class _Batch:
    """Several reads answered as one dict: one Deferred for the lot, not one per request.

    A missing node reads as None; any other error fails the whole batch (first error wins).
    """

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.values: list[bytes | None] = [None] * len(keys)
        self.remaining = len(keys)
        self.error: XenstoreError | None = None
        self.deferred: Deferred[dict[str, bytes | None]] = Deferred()
        if not keys:
            self.deferred.callback({})

    def settle(self, index: int, value: bytes | None, error: XenstoreError | None) -> None:
        if error is None:
            self.values[index] = value
        elif not isinstance(error, NoEntry) and self.error is None:
            self.error = error
        self.remaining -= 1
        if self.remaining == 0:
            if self.error is not None:
                self.deferred.errback(self.error)
            else:
                self.deferred.callback(dict(zip(self.keys, self.values, strict=True)))


class _Inbox:
    """Reader thread → reactor: completed calls and watch events, one wake-up per drain."""

    def __init__(self, reactor: _Reactor, drain: Callable[[], None], max_events: int) -> None:
        self._reactor = reactor
        self._drain = drain
        self._lock = threading.Lock()
        self._calls: list[_Call] = []
        self.events = EventQueue(max_events)
        self._scheduled = False
        #: watch token → watched path + "/": events are laned by the next path component.
        #: Written on the reactor thread, read on the reader thread (single dict operations).
        self.lane_prefixes: dict[bytes, bytes] = {}

    def deliver(self, calls: Sequence[_Call], events: Sequence[RawEvent]) -> None:
        """Called on the reader thread with what one socket read produced."""
        prefixes = self.lane_prefixes
        with self._lock:
            self._calls.extend(calls)
            for path, token in events:
                prefix = prefixes.get(token)
                if prefix is not None and path.startswith(prefix):
                    start = len(prefix)
                    end = path.find(b"/", start)
                    self.events.push(
                        path, token, (token, path[start:end] if end > 0 else path[start:])
                    )
                else:
                    self.events.push(path, token)
            if self._scheduled or not (self._calls or self.events.has_work()):
                return
            self._scheduled = True
        self._reactor.callFromThread(self._drain)

    def take(self, limit: int) -> tuple[list[_Call], EventBatch, bool]:
        """On the reactor: everything completed, up to ``limit`` events, and whether more wait.

        When more wait the inbox stays marked scheduled and the caller must drain again.
        """
        with self._lock:
            calls, self._calls = self._calls, []
            batch = self.events.take(limit)
            more = self.events.has_work()
            self._scheduled = more
        return calls, batch, more

    def discard_token(self, token: bytes) -> None:
        with self._lock:
            self.events.discard_token(token)

    def stats(self) -> EventQueueStats:
        with self._lock:
            return self.events.stats()


class _Router(pyxs.Router):  # type: ignore[misc]
    """pyxs's router thread, made safe to lose: see the module docstring for what differs.

    Reads the socket in chunks, parses with :mod:`shyped.xenstore.wire`, wakes worker
    waiters, passes reactor calls and events to the inbox, and on any error or EOF fails every
    outstanding request with ConnectionLost before telling the gateway.
    """

    def __init__(
        self,
        connection: Any,
        inbox: _Inbox,
        on_closed: Callable[[_Router, str], None],
    ) -> None:
        super().__init__(connection)
        self.thread.name = "xenstore-reader"
        self.inbox = inbox
        self._on_closed = on_closed
        self.closed = False
        self.rvars: dict[int, _Pending]
        self._req_ids = itertools.count(1)

    def submit(self, items: Sequence[_Pending], tx_id: int) -> None:
        """Write requests in one ``send``; each reply lands in its item.  Raises ConnectionLost
        (then no item will be answered)."""
        with self.send_lock:
            if self.closed:
                raise ConnectionLost("connection closed", path=items[0].path)
            frames = []
            req_ids = []
            for item in items:
                req_id = next(self._req_ids) & 0xFFFFFFFF
                frames.append(wire.pack(item.op, item.payload, req_id, tx_id))
                # Registered first: xenstored may answer before send() returns.
                self.rvars[req_id] = item
                req_ids.append(req_id)
            try:
                self.connection.transport.send(frames[0] if len(frames) == 1 else b"".join(frames))
            except (OSError, AttributeError) as exc:
                for req_id in req_ids:
                    self.rvars.pop(req_id, None)
                raise ConnectionLost(f"send failed: {exc}", path=items[0].path) from None

    def __call__(self) -> None:
        reason = "closed by the gateway"
        try:
            self._read_loop()
        except ConnectionLost as exc:
            reason = exc.detail or "connection lost"
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        finally:
            self._shut(reason)

    def _read_loop(self) -> None:
        fd = self.connection.fileno()
        stop_fd = self.r_terminator.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(stop_fd, select.POLLIN)
        buf = bytearray()
        header = wire.HEADER
        while True:
            ready = {f for f, _ in poller.poll()}
            if stop_fd in ready:
                return
            chunk = os.read(fd, _READ_CHUNK)
            if not chunk:
                raise ConnectionLost("xenstored closed the connection")
            buf += chunk
            calls: list[_Call] = []
            events: list[RawEvent] = []
            while len(buf) >= header.size:
                op, req_id, _tx, length = header.unpack_from(buf)
                if length > wire.REPLY_MAX:
                    raise wire.WireError(f"payload length {length} exceeds {wire.REPLY_MAX}")
                end = header.size + length
                if len(buf) < end:
                    break
                payload = bytes(buf[header.size : end])
                del buf[:end]
                if op == Op.WATCH_EVENT:
                    with contextlib.suppress(wire.WireError):
                        events.append(wire.watch_event(payload))
                    continue
                pending = self.rvars.pop(req_id, None)
                if pending is None:
                    raise wire.WireError(f"reply to unknown request {req_id} (type {op})")
                pending.reply_op = op
                pending.reply_payload = payload
                if isinstance(pending, _Waiter):
                    pending.wake()
                else:
                    assert isinstance(pending, _Call)
                    calls.append(pending)
            if calls or events:
                self.inbox.deliver(calls, events)

    def _shut(self, reason: str) -> None:
        with self.send_lock:
            self.closed = True
            pending, self.rvars = self.rvars, {}
        sock = getattr(self.connection.transport, "sock", None)
        self.connection.close()
        if sock is not None:
            sock.close()  # pyxs skips close() when shutdown() fails on a dead peer
        calls: list[_Call] = []
        for item in pending.values():
            item.lost = reason
            if isinstance(item, _Waiter):
                item.wake()
            elif isinstance(item, _Call):
                calls.append(item)
        if calls:
            self.inbox.deliver(calls, ())
        for end in (self.r_terminator, self.w_terminator):
            with contextlib.suppress(OSError):
                end.close()
        self._on_closed(self, reason)

    def stop(self) -> None:
        """Ask the reader to exit (from any thread); it then fails what is outstanding."""
        with contextlib.suppress(OSError):
            self.w_terminator.send(wire.NUL)


# -- blocking operations (worker threads) ----------------------------------------------------


class _Channel:
    """Blocking requests on one connection, optionally inside a transaction."""

    def __init__(self, router: _Router, config: GatewayConfig, tx_id: int = 0) -> None:
        self.router = router
        self.config = config
        self.tx_id = tx_id

    def call(self, op: int, payload: bytes, path: str | None) -> bytes:
        waiter = _Waiter(op, payload, path)
        self.router.submit((waiter,), self.tx_id)
        return waiter.wait()

    def pipeline(
        self, requests: Sequence[tuple[int, bytes, str | None]]
    ) -> list[bytes | XenstoreError]:
        """Send many requests back to back (within the window) and collect every outcome.

        Errors other than losing the connection are returned in place, not raised.
        """
        results: list[bytes | XenstoreError] = []
        todo = deque(_Waiter(op, payload, path) for op, payload, path in requests)
        window: deque[_Waiter] = deque()
        window_bytes = 0
        max_count, max_bytes = self.config.max_inflight, self.config.max_inflight_bytes
        while todo or window:
            # Refill only once half the window is free: one send for many requests.
            if todo and (not window or len(window) <= max_count // 2):
                batch: list[_Waiter] = []
                while todo and (
                    (not window and not batch)
                    or (
                        len(window) + len(batch) < max_count
                        and window_bytes + todo[0].size <= max_bytes
                    )
                ):
                    waiter = todo.popleft()
                    batch.append(waiter)
                    window_bytes += waiter.size
                self.router.submit(batch, self.tx_id)
                window.extend(batch)
            # xenstored answers a connection's requests in order: sleep until the reply that
            # frees half the window (or the last one) is in, so this thread wakes once per
            # half window rather than once per reply; then take every reply that is in.
            target = len(window) - max_count // 2 if todo else len(window)
            window[max(1, target) - 1].wait_done()
            window_bytes -= self._collect(window.popleft(), results)
            while window and window[0].done():
                window_bytes -= self._collect(window.popleft(), results)
        return results

    @staticmethod
    def _collect(waiter: _Waiter, results: list[bytes | XenstoreError]) -> int:
        try:
            results.append(waiter.wait())
        except ConnectionLost:
            raise
        except XenstoreError as exc:
            results.append(exc)
        return waiter.size

    def start(self) -> int:
        return wire.transaction_id(self.call(Op.TRANSACTION_START, wire.NUL, None))

    def end(self, tx_id: int, commit: bool) -> bool:
        """End a transaction; False if the commit conflicted (EAGAIN)."""
        channel = _Channel(self.router, self.config, tx_id)
        try:
            wire.ack(channel.call(Op.TRANSACTION_END, wire.transaction_end_payload(commit), None))
        except Again:
            return False
        return True

    def abort_quietly(self, tx_id: int) -> None:
        with contextlib.suppress(XenstoreError):
            self.end(tx_id, commit=False)


class Transaction:
    """Blocking operations inside one xenstore transaction.

    Only the function given to :meth:`XenstoreGateway.transaction` uses it, on a worker
    thread, and only during that attempt: the function may be run several times (EAGAIN), so
    it must not have effects outside xenstore.  Writes become visible (and fire watches) only
    when the gateway commits after the function returns.
    """

    def __init__(self, channel: _Channel) -> None:
        self._channel = channel
        self._open = True

    @property
    def tx_id(self) -> int:
        return self._channel.tx_id

    def _call(self, op: int, payload: bytes, path: str) -> bytes:
        if not self._open:
            raise RuntimeError("transaction handle used after its attempt ended")
        return self._channel.call(op, payload, path)

    def read(self, path: str) -> bytes:
        """The node's value; NoEntry if it does not exist."""
        return self._call(Op.READ, wire.path_payload(_encode_path(path)), path)

    def read_many(self, paths: Iterable[str]) -> dict[str, bytes | None]:
        """Several values in one round trip (pipelined); None for a node that does not exist."""
        if not self._open:
            raise RuntimeError("transaction handle used after its attempt ended")
        wanted = list(dict.fromkeys(paths))
        requests = [(int(Op.READ), wire.path_payload(_encode_path(p)), p) for p in wanted]
        out: dict[str, bytes | None] = {}
        for path, result in zip(wanted, self._channel.pipeline(requests), strict=True):
            if isinstance(result, NoEntry):
                out[path] = None
            elif isinstance(result, XenstoreError):
                raise result
            else:
                out[path] = result
        return out

    def exists(self, path: str) -> bool:
        try:
            self.directory(path)
        except NoEntry:
            return False
        return True

    def directory(self, path: str) -> tuple[str, ...]:
        return wire.children(self._call(Op.DIRECTORY, wire.path_payload(_encode_path(path)), path))

    def get_perms(self, path: str) -> tuple[Perm, ...]:
        return wire.perms(self._call(Op.GET_PERMS, wire.path_payload(_encode_path(path)), path))

    def write(self, path: str, value: bytes) -> None:
        payload = wire.write_payload(_encode_path(path), _check_value(value))
        wire.ack(self._call(Op.WRITE, payload, path))

    def mkdir(self, path: str) -> None:
        wire.ack(self._call(Op.MKDIR, wire.path_payload(_encode_path(path)), path))

    def rm(self, path: str) -> None:
        wire.ack(self._call(Op.RM, wire.path_payload(_encode_path(path)), path))

    def set_perms(self, path: str, perms: Sequence[Perm]) -> None:
        payload = wire.set_perms_payload(_encode_path(path), tuple(perms))
        wire.ack(self._call(Op.SET_PERMS, payload, path))


def _run_transaction(
    router: _Router, config: GatewayConfig, fn: Callable[[Transaction], T], max_attempts: int
) -> T:
    """Worker thread: run ``fn`` in a transaction until it commits (see transaction())."""
    channel = _Channel(router, config)
    delay = config.tx_backoff_initial
    for attempt in range(1, max_attempts + 1):
        try:
            tx_id = channel.start()
        except Again:  # cxenstored may refuse to open one under conflict pressure
            tx_id = 0
        handle = Transaction(_Channel(router, config, tx_id))
        try:
            if not tx_id:
                raise Again("EAGAIN", detail="transaction start refused")
            result = fn(handle)
        except Again:
            handle._open = False
            if tx_id:
                channel.abort_quietly(tx_id)
        except ConnectionLost:
            raise
        except BaseException:
            handle._open = False
            channel.abort_quietly(tx_id)
            raise
        else:
            handle._open = False
            if channel.end(tx_id, commit=True):
                return result
        if attempt < max_attempts:
            time.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, config.tx_backoff_max)
    raise Again("EAGAIN", detail=f"transaction still conflicting after {max_attempts} attempts")


def _walk(channel: _Channel, root: str, with_perms: bool) -> dict[str, Node]:
    """Breadth-first walk, one pipelined batch of requests per tree level."""
    nodes: dict[str, Node] = {}
    level = [root]
    per_node = 3 if with_perms else 2
    while level:
        requests: list[tuple[int, bytes, str | None]] = []
        for path in level:
            raw = wire.path_payload(_encode_path(path))
            requests.append((Op.READ, raw, path))
            requests.append((Op.DIRECTORY, raw, path))
            if with_perms:
                requests.append((Op.GET_PERMS, raw, path))
        results = channel.pipeline(requests)
        next_level: list[str] = []
        for index, path in enumerate(level):
            answers = results[index * per_node : (index + 1) * per_node]
            if any(isinstance(a, NoEntry) for a in answers):
                continue  # removed between its parent's listing and now
            for answer in answers:
                if isinstance(answer, XenstoreError):
                    raise answer
            value = answers[0]
            assert isinstance(value, bytes)
            kids = wire.children(answers[1])  # type: ignore[arg-type]
            node_perms = wire.perms(answers[2]) if with_perms else None  # type: ignore[arg-type]
            nodes[path] = Node(value, kids, node_perms)
            next_level.extend(_join(path, kid) for kid in kids)
        level = next_level
    return nodes


def _run_snapshot(router: _Router, config: GatewayConfig, root: str, with_perms: bool) -> Snapshot:
    channel = _Channel(router, config)
    delay = config.tx_backoff_initial
    nodes: dict[str, Node] = {}
    for attempt in range(1, config.snapshot_attempts + 1):
        tx_id = channel.start()
        try:
            nodes = _walk(_Channel(router, config, tx_id), root, with_perms)
        except ConnectionLost:
            raise
        except BaseException:
            channel.abort_quietly(tx_id)
            raise
        if channel.end(tx_id, commit=True):
            return Snapshot(root, nodes, consistent=True, attempts=attempt)
        if attempt < config.snapshot_attempts:
            time.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, config.tx_backoff_max)
    return Snapshot(root, nodes, consistent=False, attempts=config.snapshot_attempts)


# -- the gateway -----------------------------------------------------------------------------

_TOKEN_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@")


@attrs.define(eq=False)
class _WatchSpec:
    path: str
    token: str
    raw_path: bytes
    raw_token: bytes
    on_event: Callable[[str, str], object]
    on_overflow: Callable[[str], object] | None


class XenstoreGateway:
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

    # -- state ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is up and every watch is registered on it."""
        return self._state == "connected" and self._router is not None

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
        if self._shutdown_trigger is None:
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
        done: Deferred[list[None]] = defer.gatherResults(arms, consumeErrors=True)
        return done.addCallbacks(lambda _: None, _first_error)

    def _arm(self, spec: _WatchSpec) -> Deferred[None]:
        """Register a recorded watch on a new connection.  Only a lost connection fails the
        connect: a watch xenstored refuses (quota…) is logged and retried on the next one."""

        def refused(failure: Failure) -> None:
            if isinstance(failure.value, ConnectionLost):
                raise failure.value
            _log.error(
                "xenstored refused watch {token} on {path}: {f}",
                token=spec.token,
                path=spec.path,
                f=failure.getErrorMessage(),
            )

        return self._send_watch(spec, Op.WATCH).addErrback(refused)

    def _router_closed(self, router: _Router, reason: str) -> None:
        """Reader thread: its connection is gone."""
        self.reactor.callFromThread(self._connection_lost, router, reason)

    def _connection_lost(self, router: _Router, reason: str) -> None:
        if router is not self._router:
            return
        self._router = None
        self._fail_backlog(reason)
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

    # -- watches -------------------------------------------------------------------------

    def watch(
        self,
        path: str,
        token: str,
        on_event: Callable[[str, str], object],
        on_overflow: Callable[[str], object] | None = None,
    ) -> Deferred[None]:
        """Watch ``path`` (and everything below it) under a token unique to this gateway.

        ``on_event(path, token)`` runs on the reactor thread for each change (coalesced, see
        :mod:`shyped.xenstore.events`), including once right after registration.
        ``on_overflow(watched_path)`` runs when events of this watch were dropped: re-read the
        subtree.  The watch survives reconnects.  While disconnected it is only recorded (and
        registered on reconnect); otherwise the Deferred fires once xenstored accepted it.
        """
        try:
            raw_path = _encode_path(path, watch=True)
            raw_token = token.encode("ascii")
            if not raw_token or len(raw_token) > 256 or not set(raw_token) <= _TOKEN_CHARS:
                raise ValueError(f"invalid watch token {token!r}")
        except (ValueError, TypeError, UnicodeEncodeError) as exc:
            return defer.fail(exc)
        if raw_token in self._watches:
            return defer.fail(ValueError(f"watch token {token!r} already in use"))
        spec = _WatchSpec(path, token, raw_path, raw_token, on_event, on_overflow)
        self._watches[raw_token] = spec
        self._inbox.lane_prefixes[raw_token] = raw_path if raw_path == b"/" else raw_path + b"/"
        if self._router is None:
            return defer.succeed(None)

        def rejected(failure: Failure) -> Failure:
            permanent = not isinstance(failure.value, ConnectionLost)
            if permanent and self._watches.get(raw_token) is spec:
                del self._watches[raw_token]
                self._inbox.lane_prefixes.pop(raw_token, None)
            return failure

        return self._send_watch(spec, Op.WATCH).addErrback(rejected)

    def unwatch(self, token: str) -> Deferred[None]:
        """Remove a watch; its pending events are discarded."""
        raw_token = token.encode("ascii")
        spec = self._watches.pop(raw_token, None)
        if spec is None:
            return defer.fail(KeyError(token))
        self._inbox.lane_prefixes.pop(raw_token, None)
        self._inbox.discard_token(raw_token)
        if self._router is None:
            return defer.succeed(None)
        return self._send_watch(spec, Op.UNWATCH)

    def watched(self) -> dict[str, str]:
        """token → path of every watch (armed or waiting for a connection)."""
        return {spec.token: spec.path for spec in self._watches.values()}

    def _send_watch(self, spec: _WatchSpec, op: int) -> Deferred[None]:
        payload = wire.watch_payload(spec.raw_path, spec.raw_token)
        return self._request(op, payload, spec.path, wire.ack)

    def _dispatch(self, batch: EventBatch) -> None:
        for raw_path, raw_token in batch.events:
            spec = self._watches.get(raw_token)
            if spec is None:
                continue
            try:
                path = raw_path.decode("ascii")
            except UnicodeDecodeError:
                self._overflowed(spec)  # cannot happen with a sane xenstored; re-read instead
                continue
            try:
                spec.on_event(path, spec.token)
            except Exception:
                _log.failure("watch callback for {token} raised", token=spec.token)
        for raw_token in batch.overflowed:
            spec = self._watches.get(raw_token)
            if spec is not None:
                self._overflowed(spec)

    def _overflowed(self, spec: _WatchSpec) -> None:
        _log.warn("xenstore watch {token} on {path} overflowed", token=spec.token, path=spec.path)
        if spec.on_overflow is None:
            return
        try:
            spec.on_overflow(spec.path)
        except Exception:
            _log.failure("overflow callback for {token} raised", token=spec.token)

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
        """Child names; NoEntry if absent."""
        return self._path_request(Op.DIRECTORY, path, wire.children)

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
        try:
            _encode_path(root)
        except (ValueError, TypeError) as exc:
            return defer.fail(exc)
        if not root.startswith("/"):
            return defer.fail(ValueError(f"snapshot root must be absolute, got {root!r}"))
        return self._in_worker(_run_snapshot, root, with_perms)


def _first_error(failure: Failure) -> Failure:
    if isinstance(failure.value, defer.FirstError):
        return failure.value.subFailure
    return failure
