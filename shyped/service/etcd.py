"""A small etcd v3 client on the Twisted reactor: treq over etcd's v3 JSON gateway.

Why this client (docs/pool.md, "The etcd client"): etcd serves its gRPC API also as JSON over
HTTP (the grpc-gateway, ``/v3/kv/range``, ``/v3/kv/put``, ``/v3/kv/txn``, ``/v3/lease/*`` and
the streaming ``/v3/watch``) on the same client port, in every 3.4 build Debian ships. treq is
Twisted's own maintained HTTP client, so every call is a Deferred on the daemon's reactor: no
thread per watch, no second event loop, no gRPC stack. The Python gRPC clients for etcd
(``etcd3``, ``python-etcd3``) are unmaintained or pin old protobuf releases and block a thread
per watch. Checked here on etcd 3.4.23: a ``/v3/watch`` POST answers 200 and streams one JSON
object per line (the ``created`` answer, then one line per revision), which `treq.collect`
hands over as it arrives.

Keys and values are base64 on the wire; this module speaks ``str`` (UTF-8) to its callers.
Every answer is read with a size bound (`MAX_RESPONSE`) and every call has a timeout; a call
tries each endpoint in turn and raises `EtcdUnavailable` when none answers (quorum lost, all
members down). Nothing here listens: it only connects to the configured endpoints.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss

from shyped.pool.keys import range_end
from shyped.service.etcdtls import EtcdSecurity, make_agent

_log = Logger(namespace="shyped.pool")

#: Largest answer read from etcd (a range of the whole prefix included).
MAX_RESPONSE: Final = 64 * 1024 * 1024
#: Keys asked for per page of a range (fewer when a page's answer is over `MAX_RESPONSE`).
RANGE_PAGE: Final = 1000
#: Longest line of a watch stream (one revision's events).
MAX_WATCH_LINE: Final = 8 * 1024 * 1024


_JSON: dict[bytes | str, bytes | str] = {"Content-Type": "application/json"}


class EtcdError(Exception):
    """etcd answered with an error (e.g. a request over its limits)."""


class EtcdAnswerTooLong(EtcdError):
    """An answer over `MAX_RESPONSE` (a range is then read again in smaller pages)."""


class EtcdAuthError(EtcdError):
    """etcd refused the request's credentials (no token, expired, or wrong password)."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered in time (members down, or the cluster has no quorum)."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: Any) -> str:
    """A key or value as etcd sent it (base64). Bytes that are not UTF-8 (anyone with write
    access may store them) become U+FFFD: no pool key, label or record holds that character,
    so the entry is refused by its reader, never the whole range or watch it came in."""
    if not isinstance(text, str):
        raise EtcdError("etcd answered a key or value that is not a string")
    try:
        return base64.b64decode(text, validate=True).decode(errors="replace")
    except ValueError:
        raise EtcdError("etcd answered a key or value that is not base64") from None


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        raise EtcdError(f"etcd answered {value!r} where a number belongs") from None


@attrs.frozen
class KeyValue:
    key: str
    value: str
    mod_revision: int
    lease: int = 0


@attrs.frozen
class WatchEvent:
    """One change: ``put`` (with the new value) or ``delete``."""

    kind: str
    key: str
    value: str
    revision: int


def _kv(doc: Any) -> KeyValue:
    if not isinstance(doc, dict):
        raise EtcdError("etcd answered a key-value that is not an object")
    return KeyValue(
        _unb64(doc.get("key", "")),
        _unb64(doc.get("value", "")),
        _int(doc.get("mod_revision")),
        _int(doc.get("lease")),
    )


async def _read(response: Any, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0

    def take(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:  # treq.collect stops reading when the collector raises
            raise EtcdAnswerTooLong(f"etcd answer longer than {limit} bytes")
        chunks.append(data)

    await treq.collect(response, take)
    return b"".join(chunks)


class _Stream(Protocol):
    """A watch's response body: each chunk to `collector`; closed by `Watch.cancel`."""

    def __init__(self, finished: Deferred[None], collector: Callable[[bytes], None]) -> None:
        self.finished: Deferred[None] | None = finished
        self.collector = collector
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.collector(data)
        except Exception:
            self.close()
            if self.finished is not None:
                finished, self.finished = self.finished, None
                finished.errback(Failure())  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.stopProducing()  # the HTTP connection is dropped

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished is None:
            return
        finished, self.finished = self.finished, None
        if reason.check(ResponseDone, PotentialDataLoss):  # type: ignore[no-untyped-call]
            finished.callback(None)
        else:
            finished.errback(reason)


class Watch:
    """A running watch; `cancel` ends it: its connection is dropped and nothing more is
    delivered."""

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred()
        self._request: Deferred[Any] | None = None
        self._stream: _Stream | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        if self._stream is not None:
            self._stream.close()
            if self._stream.finished is not None:
                finished, self._stream.finished = self._stream.finished, None
                finished.callback(None)
        elif self._request is not None:
            self._request.cancel()


class EtcdClient:
    """Calls to a set of etcd endpoints (``http://127.0.0.1:2379`` …), first that answers."""

    def __init__(
        self,
        reactor: Any,
        endpoints: Sequence[str],
        timeout: float = 2.0,
        security: EtcdSecurity | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.reactor = reactor
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.security = security
        self._current = 0
        self._token: str | None = None
        self._pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
        self._pool.maxPersistentPerHost = 4
        self._http = HTTPClient(make_agent(reactor, self._pool, timeout, security))
        # Watches are long-lived streams: their own connections, never pooled.
        streams = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]
        self._watch_http = HTTPClient(make_agent(reactor, streams, timeout, security))

    def _headers(self) -> dict[bytes | str, bytes | str]:
        if self._token is None:
            return _JSON
        return {**_JSON, "Authorization": self._token}

    async def authenticate(self) -> None:
        """Trade the user and password for a token (etcd's RBAC is on)."""
        sec = self.security
        if sec is None or sec.user is None or sec.password is None:
            raise EtcdError("etcd asks for authentication: set pool.user and pool.password_file")
        self._token = None
        doc = await self.call(
            "auth/authenticate", {"name": sec.user, "password": sec.password}, _auth=False
        )
        token = doc.get("token")
        if not isinstance(token, str) or not token or len(token) > 4096:
            raise EtcdError("etcd answered no usable token")
        self._token = token

    async def call(self, path: str, body: dict[str, Any], _auth: bool = True) -> dict[str, Any]:
        """POST `body` to ``/v3/<path>`` on the first endpoint that answers (authenticating
        first, or again when the token expired, if etcd's RBAC is on)."""
        if _auth and self._token is None and self.security is not None and self.security.user:
            await self.authenticate()
        try:
            return await self._rounds(path, body)
        except EtcdAuthError:
            if not _auth or self.security is None or not self.security.user:
                raise
            await self.authenticate()
            return await self._rounds(path, body)

    async def _rounds(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Every endpoint in turn; when they all failed *fast* (a leader election after a
        member died, refused connections), twice more after a short pause. A round that
        took the whole timeout is not repeated: quorum loss is reported without delay."""
        for pause in (0.2, 0.5, None):
            started = self.reactor.seconds()
            try:
                return await self._call(path, body)
            except EtcdUnavailable:
                if pause is None or self.reactor.seconds() - started >= self.timeout:
                    raise
            await task.deferLater(self.reactor, pause, lambda: None)
        raise AssertionError("not reached")  # pragma: no cover

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors: list[str] = []
        for i in range(len(self.endpoints)):
            index = (self._current + i) % len(self.endpoints)
            url = self.endpoints[index] + "/v3/" + path
            try:
                response = await self._http.post(
                    url,
                    data=json.dumps(body).encode(),
                    headers=self._headers(),
                    timeout=self.timeout,
                )
                data = await _read(response, MAX_RESPONSE)
            except EtcdError:
                raise
            except Exception as exc:
                errors.append(f"{self.endpoints[index]}: {type(exc).__name__}")
                continue
            try:
                doc = json.loads(data)
            except ValueError:
                errors.append(f"{self.endpoints[index]}: not JSON")
                continue
            if response.code != 200 or not isinstance(doc, dict):
                message = doc.get("error") or doc.get("message") if isinstance(doc, dict) else doc
                text = str(message)
                if response.code == 401 or "auth token" in text or "user name is empty" in text:
                    raise EtcdAuthError(f"etcd {path}: {text[:300]}")
                if response.code in (500, 503, 504) or "timed out" in str(message):
                    errors.append(f"{self.endpoints[index]}: {str(message)[:200]}")
                    continue
                raise EtcdError(f"etcd {path}: {str(message)[:500]}")
            self._current = index
            return doc
        raise EtcdUnavailable("no etcd endpoint answered (" + "; ".join(errors) + ")")

    async def range_prefix(
        self, prefix: str, keep: Callable[[KeyValue], bool] | None = None
    ) -> tuple[int, list[KeyValue]]:
        """Every key below `prefix` (those `keep` accepts), at one revision, read in pages:
        a page over `MAX_RESPONSE` is read again in smaller ones (down to one key), so large
        values under the prefix cannot make the whole range unreadable."""
        end = _b64(range_end(prefix))
        start, limit, revision = prefix, RANGE_PAGE, 0
        out: list[KeyValue] = []
        while True:
            body: dict[str, Any] = {"key": _b64(start), "range_end": end, "limit": limit}
            if revision:
                body["revision"] = str(revision)  # the pages of one snapshot
            try:
                doc = await self.call("kv/range", body)
            except EtcdAnswerTooLong:
                if limit == 1:
                    raise
                limit = max(1, limit // 8)
                continue
            kvs = doc.get("kvs") or []
            if not isinstance(kvs, list):
                raise EtcdError("etcd range: kvs is not a list")
            revision = revision or _int(doc.get("header", {}).get("revision"))
            page = [_kv(d) for d in kvs]
            out.extend(kv for kv in page if keep is None or keep(kv))
            if not doc.get("more") or not page:
                return revision, out
            start = page[-1].key + "\0"

    async def newest_revision(self, prefix: str) -> int:
        """The highest mod revision of a key below `prefix` (0: none), keys only."""
        doc = await self.call(
            "kv/range",
            {
                "key": _b64(prefix),
                "range_end": _b64(range_end(prefix)),
                "limit": 1,
                "sort_order": "DESCEND",
                "sort_target": "MOD",
                "keys_only": True,
            },
        )
        kvs = doc.get("kvs") or []
        return _kv(kvs[0]).mod_revision if isinstance(kvs, list) and kvs else 0

    async def get(self, key: str) -> KeyValue | None:
        doc = await self.call("kv/range", {"key": _b64(key)})
        kvs = doc.get("kvs") or []
        return _kv(kvs[0]) if isinstance(kvs, list) and kvs else None

    async def put(self, key: str, value: str, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        doc = await self.call("kv/put", body)
        return _int(doc.get("header", {}).get("revision"))

    async def delete(self, key: str) -> None:
        await self.call("kv/deleterange", {"key": _b64(key)})

    async def delete_prefix(self, prefix: str) -> None:
        await self.call(
            "kv/deleterange", {"key": _b64(prefix), "range_end": _b64(range_end(prefix))}
        )

    async def put_if_version(self, key: str, value: str, mod_revision: int, lease: int = 0) -> bool:
        """One transaction: put `value` only if `key`'s mod revision is still `mod_revision`
        (0: the key does not exist). True if it was written."""
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        doc = await self.call(
            "kv/txn",
            {
                "compare": [
                    {
                        "key": _b64(key),
                        "target": "MOD",
                        "result": "EQUAL",
                        "mod_revision": str(mod_revision),
                    }
                ],
                "success": [{"request_put": put}],
            },
        )
        return bool(doc.get("succeeded", False))

    async def lease_grant(self, ttl: int) -> int:
        doc = await self.call("lease/grant", {"TTL": str(ttl)})
        return _int(doc.get("ID"))

    async def lease_keepalive(self, lease: int) -> int:
        """Refresh `lease`; its remaining TTL (0: it has expired)."""
        doc = await self.call("lease/keepalive", {"ID": str(lease)})
        result = doc.get("result", {})
        return _int(result.get("TTL")) if isinstance(result, dict) else 0

    def watch(
        self,
        prefix: str,
        start_revision: int,
        on_events: Callable[[list[WatchEvent]], None],
    ) -> Watch:
        """Stream the changes below `prefix` from `start_revision` on; `on_events` gets each
        revision's events in order. `Watch.done` fires (or fails) when the stream ends."""
        watch = Watch()
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _b64(range_end(prefix)),
                "start_revision": str(start_revision),
            }
        }
        index = self._current
        url = self.endpoints[index] + "/v3/watch"
        buf = bytearray()

        def line(raw: bytes) -> None:
            doc = json.loads(raw)
            result = doc.get("result") if isinstance(doc, dict) else None
            if not isinstance(result, dict):
                raise EtcdError(f"watch: {str(doc)[:300]}")
            if result.get("canceled"):
                raise EtcdError(f"watch cancelled by etcd: {result.get('cancel_reason', '')}")
            events = []
            for ev in result.get("events") or []:
                kv = _kv(ev.get("kv") if isinstance(ev, dict) else None)
                kind = "delete" if ev.get("type") == "DELETE" else "put"
                events.append(WatchEvent(kind, kv.key, kv.value, kv.mod_revision))
            if events:
                on_events(events)

        def chunk(data: bytes) -> None:
            buf.extend(data)
            while (i := buf.find(b"\n")) >= 0:
                raw = bytes(buf[:i])
                del buf[: i + 1]
                if raw.strip():
                    line(raw)
            if len(buf) > MAX_WATCH_LINE:
                raise EtcdError(f"watch line longer than {MAX_WATCH_LINE} bytes")

        async def run() -> None:
            if self._token is None and self.security is not None and self.security.user:
                await self.authenticate()
            request = self._watch_http.post(
                url,
                data=json.dumps(body).encode(),
                unbuffered=True,
                headers=self._headers(),
                timeout=self.timeout,
            )
            watch._request = request
            response = await request
            if response.code != 200:
                raise EtcdUnavailable(f"watch on {self.endpoints[index]}: HTTP {response.code}")
            finished: Deferred[None] = Deferred()
            stream = _Stream(finished, chunk)
            watch._stream = stream
            if watch.cancelled:
                stream.closed = True
            response.deliverBody(stream)
            if watch.cancelled:
                stream.close()
                return
            await finished

        # The next watch starts at another endpoint if this one failed.
        def failed(f: Any) -> Any:
            self._current = (index + 1) % len(self.endpoints)
            return f

        d = Deferred.fromCoroutine(run())
        d.addErrback(failed)
        d.addErrback(lambda f: None if watch.cancelled else f)  # ended by `cancel`
        d.chainDeferred(watch.done)
        return watch

    def close(self) -> Deferred[None]:
        closed: Deferred[None] = self._pool.closeCachedConnections()  # type: ignore[no-untyped-call]
        return closed if closed is not None else defer.succeed(None)
