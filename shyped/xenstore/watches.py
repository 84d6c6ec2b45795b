"""The gateway's watches (`shyped.xenstore.gateway`): registered under a token, kept across
reconnects (registered again on each new connection), their events dispatched on the reactor
thread, an overflowed watch reported so that its subtree is read again. `WatchRoutes` is a
part of `XenstoreGateway`; the bound, coalescing and lanes of the events are
`shyped.xenstore.events`'s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from shyped.xenstore import wire
from shyped.xenstore.errors import ConnectionLost
from shyped.xenstore.events import EventBatch
from shyped.xenstore.router import _encode_path, _Inbox
from shyped.xenstore.wire import Op

T = TypeVar("T")

_log = Logger(namespace="shyped.xenstore")

_TOKEN_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@")


@attrs.define(eq=False)
class _WatchSpec:
    path: str
    token: str
    raw_path: bytes
    raw_token: bytes
    on_event: Callable[[str, str], object]
    on_overflow: Callable[[str], object] | None


class WatchRoutes:
    """Watches of the gateway (see the module docstring); reactor thread only."""

    # what the gateway provides
    _watches: dict[bytes, _WatchSpec]
    _inbox: _Inbox
    _router: Any

    def _request(
        self, op: int, payload: bytes, path: str | None, decode: Callable[[bytes], T]
    ) -> Deferred[T]:
        raise NotImplementedError

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
        for lane in batch.overflowed_lanes:  # (token, first component below the watch)
            raw_token, part = lane if isinstance(lane, tuple) else (lane, b"")
            spec = self._watches.get(raw_token)
            if spec is not None:
                self._overflowed(spec, part)

    def _overflowed(self, spec: _WatchSpec, part: bytes = b"") -> None:
        """Events of `spec` were dropped: re-read its subtree, or only the one below its
        path named `part` (one lane: a guest's home, when that guest flooded)."""
        path = spec.path
        if part and part.isascii():
            path = f"{path.rstrip('/')}/{part.decode('ascii')}"
        _log.warn("xenstore watch {token} overflowed on {path}", token=spec.token, path=path)
        if spec.on_overflow is None:
            return
        try:
            spec.on_overflow(path)
        except Exception:
            _log.failure("overflow callback for {token} raised", token=spec.token)
