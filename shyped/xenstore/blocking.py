"""Blocking operations on worker threads: requests on one connection, transactions (retried on
EAGAIN); the subtree walks built on them are in `shyped.xenstore.snapshot`."""

from __future__ import annotations

import contextlib
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from shyped.xenstore import listing, wire
from shyped.xenstore.errors import (
    Again,
    ConnectionLost,
    NoEntry,
    XenstoreError,
)
from shyped.xenstore.gatewayconfig import GatewayConfig
from shyped.xenstore.router import (
    _check_value,
    _encode_path,
    _Router,
    _Waiter,
)
from shyped.xenstore.wire import Op, Perm

T = TypeVar("T")


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
        self._discard = False

    def discard(self) -> None:
        """End this attempt without committing: everything it wrote is dropped (the
        function's result is still returned). Lets a function send writes before it knows
        whether it wants them (`apply_if`) and give them up after."""
        self._discard = True

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
        """Child names, however many (`listing`: in parts where xenstored wants that)."""
        return listing.directory(lambda op, p: self._call(op, p, path), path, _encode_path(path))

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

    def apply_if(self, path: str | None, expect: bytes, changes: Sequence[Change]) -> bool:
        """Make `changes` in order if `path` holds `expect` (None: unconditionally), in one
        round trip: the read and the changes are pipelined, and when the read shows anything
        else (or no node) the attempt is discarded (aborted, so the changes never happened)
        and False returned. Otherwise the first change's error is raised, or True returned."""
        if not self._open:
            raise RuntimeError("transaction handle used after its attempt ended")
        requests: list[tuple[int, bytes, str | None]] = list(change_requests(path, changes))
        results = self._channel.pipeline(requests)
        if path is not None:
            seen = results.pop(0)
            if isinstance(seen, XenstoreError) and not isinstance(seen, NoEntry):
                raise seen
            if seen != expect:
                self.discard()
                return False
        for result in results:
            if isinstance(result, XenstoreError):
                raise result
            wire.ack(result)
        return True


#: One change `Transaction.apply_if` makes: (Op.MKDIR, path, None), (Op.WRITE, path,
#: value) or (Op.SET_PERMS, path, perms).
Change = tuple[Op, str, bytes | Sequence[Perm] | None]


def change_requests(path: str | None, changes: Sequence[Change]) -> list[tuple[int, bytes, str]]:
    """The requests of an `apply_if`: the check's READ of `path` (unless None), then the
    changes, framed as (op, payload, path); ValueError for a path xenstored would refuse."""
    out: list[tuple[int, bytes, str]] = []
    if path is not None:
        out.append((int(Op.READ), wire.path_payload(_encode_path(path)), path))
    for op, where, arg in changes:
        raw = _encode_path(where)
        if op is Op.MKDIR:
            out.append((int(op), wire.path_payload(raw), where))
        elif op is Op.WRITE:
            assert isinstance(arg, bytes)
            out.append((int(op), wire.write_payload(raw, _check_value(arg)), where))
        else:
            assert op is Op.SET_PERMS and not isinstance(arg, bytes | None)
            out.append((int(op), wire.set_perms_payload(raw, tuple(arg)), where))
    return out


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
            if handle._discard:
                channel.abort_quietly(tx_id)
                return result
            if channel.end(tx_id, commit=True):
                return result
        if attempt < max_attempts:
            time.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, config.tx_backoff_max)
    raise Again("EAGAIN", detail=f"transaction still conflicting after {max_attempts} attempts")
