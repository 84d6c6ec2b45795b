"""The connection's reader side: request framing, pending requests, the reader thread's router
and the inbox it hands replies and watch events to the reactor through.

See `shyped.xenstore.gateway` for the threads and why pyxs's own client is not used."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import select
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pyxs
from twisted.internet.defer import Deferred

from shyped.xenstore import wire
from shyped.xenstore.errors import (
    ConnectionLost,
    NoEntry,
    XenstoreError,
    from_errno_name,
)
from shyped.xenstore.events import EventBatch, EventQueue, EventQueueStats, RawEvent
from shyped.xenstore.gatewayconfig import (
    _Reactor,
)
from shyped.xenstore.wire import Op

#: Per-read chunk: many replies/events per system call under load, yet few enough (~200 events)
#: that parsing one chunk holds the GIL well under the 5 ms switch interval the reactor
#: thread would otherwise wait when it wakes up during a flood.
_READ_CHUNK = 8192


# -- wire plumbing ---------------------------------------------------------------------------


def _encode_path(path: str, *, watch: bool = False) -> bytes:
    """Validate a path the way xenstored will and encode it (ValueError if it would refuse)."""
    if not isinstance(path, str):
        raise TypeError(f"xenstore paths are str, got {type(path).__name__}")
    return _encode_str_path(path, watch)


@functools.lru_cache(maxsize=2048)
def _encode_str_path(path: str, watch: bool) -> bytes:
    """`_encode_path` past its type check, memoised (bounded): a batch reads the same few
    dozen paths of a domain again and again; a refused path is not cached (raises each time)."""
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


def _as_dict(keys: list[str], values: list[Any]) -> dict[str, Any]:
    return dict(zip(keys, values, strict=True))


class _Batch:
    """Several reads answered as one dict: one Deferred for the lot, not one per request.

    A missing node reads as None; any other error fails the whole batch (first error wins).
    `finish` shapes the result from the keys and the values in their order (default: a dict).
    """

    def __init__(
        self, keys: list[str], finish: Callable[[list[str], list[Any]], Any] = _as_dict
    ) -> None:
        self.keys = keys
        self.values: list[Any] = [None] * len(keys)
        self.remaining = len(keys)
        self.error: XenstoreError | None = None
        self.finish = finish
        self.deferred: Deferred[Any] = Deferred()
        if not keys:
            self.deferred.callback(finish(keys, self.values))

    def settle(self, index: int, value: Any, error: XenstoreError | None) -> None:
        if error is None:
            self.values[index] = value
        elif not isinstance(error, NoEntry) and self.error is None:
            self.error = error
        self.remaining -= 1
        if self.remaining == 0:
            if self.error is not None:
                self.deferred.errback(self.error)
            else:
                self.deferred.callback(self.finish(self.keys, self.values))


class _Inbox:
    """Reader thread → reactor: completed calls and watch events, one wake-up per drain."""

    def __init__(self, reactor: _Reactor, drain: Callable[[], None], max_events: int) -> None:
        self._reactor = reactor
        self._drain = drain
        self._lock = threading.Lock()
        self._calls: list[_Call] = []
        #: one lane (a guest's home) holds at most half the queue: a flooding guest overflows
        #: its own lane, and only its tree is read again (`EventQueue`)
        self.events = EventQueue(max_events, max_per_lane=max(1, max_events // 2))
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
                    part = path[start:end] if end > 0 else path[start:]
                    # dom0's own tree (/local/domain/0) is written by dom0 alone: not capped
                    self.events.push(path, token, (token, part), capped=part != b"0")
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
            for op, req_id, payload in wire.take_frames(buf):
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
