"""Migration and restore reservations over the pool store (docs/pool.md, "Migration").

The destination's daemon is the one authority for its host: it answers every request under
``P/reservations/<source>/<host>/`` itself (the source writes only its own range, the
destination only ``P/grants/<host>/``: with per-host etcd users, `shyped.pool.rbac`, no host
can forge another's request or grant), one at a time, with this daemon's policy and Chinese
Wall running set plus the reservations it granted and that are not settled yet (`held`), so
concurrent requests for rivals are serialised here. A grant is written under
``P/grants/<host>/<source>/<id>`` (keyed by source too: a request another host files under the
same id gets its own answer); it is consumed when a domain with its UUID runs on this host,
and lapses after `GRANT_TTL`. Requests are untrusted (`shyped.pool.reservation.parse_request`);
a request naming another destination, or past `MAX_HELD`, is refused.
"""

from __future__ import annotations

import uuid as uuidlib
from collections import Counter
from typing import Any, Final

import attrs
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from shyped.policy.chinese_wall import running_set
from shyped.pool.placement import quota_full
from shyped.pool.records import RecordError
from shyped.pool.reservation import (
    GRANT_TTL,
    MAX_HELD,
    Grant,
    Request,
    State,
    parse_grant,
    parse_request,
)
from shyped.service.etcd import EtcdError
from shyped.service.poolstore import PoolStore, PoolUnavailable

_log = Logger(namespace="shyped.pool")

#: How long a requester waits for the destination's answer.
ANSWER_TIMEOUT: Final = 10.0
#: Request ids remembered as answered (those still filed under the prefix).
MAX_ANSWERED: Final = 100_000


@attrs.define
class Held:
    request: Request
    expires: float
    state: State = State.GRANTED


class Reservations:
    """Both sides of reservations for one daemon (`daemon`) on its pool store."""

    def __init__(self, daemon: Any, pool: PoolStore) -> None:
        self.daemon = daemon
        self.pool = pool
        self.reactor = pool.reactor
        self.base = pool.keys.reservations
        self.held: dict[str, Held] = {}
        self._answered: set[str] = set()
        self.granted = 0
        self.refused = 0
        self.ignored = 0
        pool.listeners.append(self._on_entries)

    # ------------------------------------------------------------------ the destination

    def _mine(self, key: str) -> tuple[str, str] | None:
        """(source, request id) of a request for this host (the source taken from the key:
        the range only the source may write)."""
        owned = self.pool.keys.owned(self.base, key)
        if owned is None:
            return None
        dest, sep, rid = owned[1].partition("/")
        return (owned[0], rid) if sep and dest == self.pool.keys.host else None

    def _on_entries(self, entries: dict[str, str], changed: set[str] | None) -> None:
        self._settle()
        keys = sorted(changed if changed is not None else entries)
        if changed is None:  # a whole snapshot: forget the ids no longer filed
            self._answered &= {k for k in entries if self._mine(k) is not None}
        for key in keys:
            mine = self._mine(key)
            if mine is not None and key not in entries:  # gone: forget its id
                self._answered.discard(key)
            elif (
                mine is not None
                and key not in self._answered
                and len(self._answered) < MAX_ANSWERED
            ):
                self._answered.add(key)
                self._decide(mine[1], entries[key], mine[0])

    def _decide(self, rid: str, text: str, source: str) -> None:
        host = self.pool.keys.host
        try:
            req = parse_request(text)
        except RecordError as exc:
            grant = (
                Grant(rid, State.REFUSED, f"bad request: {exc}", host) if len(rid) == 32 else None
            )
            if grant is not None:
                self._write(grant, source)
            return
        if req.source not in self.pool.host_states()[0]:
            self.ignored += 1  # not from a live member: no answer (a flood writes nothing)
            return
        if req.id != rid or req.dest != host or req.source != source:
            self._write(
                Grant(
                    rid,
                    State.REFUSED,
                    "the request names another reservation or host than the range it is filed in",
                    host,
                ),
                source,
            )
            return
        grant = self.check(req)
        if grant.state is State.GRANTED:
            self.held[f"{source}/{req.id}"] = Held(req, self.reactor.seconds() + GRANT_TTL)
            self.reactor.callLater(GRANT_TTL, self._settle)  # lapses on a quiet pool too
            self.granted += 1
            self._hold()
        else:
            self.refused += 1
        _log.info(
            "pool: reservation {id} ({kind} of {uuid}, {label}) from {source}: {state}: {reason}",
            id=req.id[:8],
            kind=req.kind,
            uuid=req.uuid,
            label=req.label,
            source=req.source,
            state=grant.state.value,
            reason=grant.reason,
        )
        self._write(grant, source)

    def check(self, req: Request) -> Grant:
        """Grant or refuse `req` now (pure decision over this daemon's state)."""
        host = self.pool.keys.host
        if len(self.held) >= MAX_HELD:
            return Grant(req.id, State.REFUSED, f"{MAX_HELD} reservations held already", host)
        engine = self.daemon.engine
        if any(d.uuid == req.uuid for d in self.daemon.host.domains()):
            return Grant(req.id, State.REFUSED, f"a domain with UUID {req.uuid} runs here", host)
        if any(h.request.uuid == req.uuid for h in self.held.values()):
            return Grant(req.id, State.REFUSED, f"UUID {req.uuid} is reserved here already", host)
        labels = [n for n, c in engine.running.running_labels().items() for _ in range(c)]
        labels += [h.request.label for h in self.held.values()]
        decision = running_set(engine.policy, labels).admit(req.label)
        counts = Counter(labels)
        full = quota_full(engine.policy, req.label, counts) if decision.permitted else None
        if full is not None:
            return Grant(req.id, State.REFUSED, full, host)
        state = State.GRANTED if decision.permitted else State.REFUSED
        return Grant(req.id, state, decision.reason, host)

    def _write(self, grant: Grant, source: str) -> None:
        key = self.pool.keys.grant(grant.id, None, source)
        d = Deferred.fromCoroutine(self.pool.client.put(key, grant.to_json(), self.pool.lease))
        d.addErrback(
            lambda f: _log.error("pool: grant {id} not written: {e}", id=grant.id, e=f.value)
        )

    def _settle(self) -> None:
        """Drop held reservations whose domain now runs here (consumed) or that lapsed."""
        now = self.reactor.seconds()
        running = {d.uuid for d in self.daemon.host.domains() if d.uuid}
        for rid, h in list(self.held.items()):
            if h.request.uuid in running:
                h.state = State.CONSUMED
            elif now >= h.expires:
                h.state = State.EXPIRED
            if h.state is not State.GRANTED:
                del self.held[rid]
        self._hold()

    def _hold(self) -> None:
        """Tell the engine the places held here: a domain started by hand meanwhile is
        admitted as if the incoming ones ran (docs/pool.md, "Migration")."""
        held = {h.request.uuid: h.request.label for h in self.held.values()}
        if self.daemon.engine.held != held:
            self.daemon.engine.held = held

    # ------------------------------------------------------------------ the requester

    def request(self, uuid: str, label: str, dest: str, kind: str) -> Deferred[Grant]:
        return Deferred.fromCoroutine(self._request(uuid, label, dest, kind))

    async def _request(self, uuid: str, label: str, dest: str, kind: str) -> Grant:
        self.pool.check_writable()
        keys = self.pool.keys
        if keys.host_state(dest) not in self.pool.entries:
            return Grant(
                "0" * 32, State.REFUSED, f"host {dest} is not a live member of the pool", dest
            )
        rid = uuidlib.uuid4().hex
        req = Request(rid, uuid.lower(), label, keys.host, dest, kind)
        try:
            await self.pool.client.put(keys.request(dest, rid), req.to_json(), self.pool.lease)
        except EtcdError as exc:
            raise PoolUnavailable(f"reservation not requested: {exc}") from None
        answer = keys.grant(rid, dest)  # only from the destination's own range
        deadline = self.reactor.seconds() + ANSWER_TIMEOUT
        while answer not in self.pool.entries:
            if self.reactor.seconds() > deadline:
                return Grant(rid, State.REFUSED, f"no answer from {dest} in time", dest)
            await task.deferLater(self.reactor, 0.02, lambda: None)
        try:
            grant = parse_grant(self.pool.entries[answer])
        except RecordError as exc:
            return Grant(rid, State.REFUSED, f"unusable answer from {dest}: {exc}", dest)
        if grant.id != rid or grant.host != dest:
            return Grant(rid, State.REFUSED, f"answer from {dest} names another request", dest)
        return grant
