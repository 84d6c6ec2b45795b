"""Migration and restore reservations (pure): the request a source writes for a destination
host, the destination daemon's grant or refusal, and the state each reservation is in.

Only the destination's daemon answers requests for its host
(``P/reservations/<source>/<host>/<id>`` -> ``P/grants/<host>/<source>/<id>``), one at a time
in etcd's revision order, counting the reservations it granted and that are not settled yet
as running domains: two concurrent requests for Chinese Wall rivals on one empty host get one
grant and one refusal."""

from __future__ import annotations

import enum
import json
import re
from typing import Any, Final

import attrs

from shyped.pool.records import HOST_RE, ID_RE, NAME_RE, RecordError, json_object

#: Seconds a grant holds its place on the destination before it lapses.
GRANT_TTL: Final = 60.0
#: Reservations one destination holds at once (more are refused: fail closed).
MAX_HELD: Final = 256

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


class State(enum.StrEnum):
    REQUESTED = "requested"
    GRANTED = "granted"
    REFUSED = "refused"
    CONSUMED = "consumed"  #: the incoming domain was admitted under it
    RELEASED = "released"  #: the move did not happen (cancelled, or failed)
    EXPIRED = "expired"


_MOVES: Final = {
    State.REQUESTED: {State.GRANTED, State.REFUSED},
    State.GRANTED: {State.CONSUMED, State.RELEASED, State.EXPIRED},
}


class TransitionError(ValueError):
    """A reservation asked to move where it cannot (e.g. a refused one consumed)."""


def advance(current: State, to: State) -> State:
    if to not in _MOVES.get(current, set()):
        raise TransitionError(f"a reservation cannot go from {current} to {to}")
    return to


@attrs.frozen
class Request:
    id: str
    uuid: str
    label: str
    source: str
    dest: str
    kind: str  # "migrate" or "restore"

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), sort_keys=True)


def _str(doc: dict[str, Any], key: str, pattern: re.Pattern[str]) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise RecordError(f"reservation: {key} is not valid")
    return value


def parse_request(text: str) -> Request:
    doc = json_object(text, "reservation", 4096)
    if doc.get("kind") not in ("migrate", "restore"):
        raise RecordError("reservation: kind must be migrate or restore")
    return Request(
        _str(doc, "id", ID_RE), _str(doc, "uuid", _UUID), _str(doc, "label", NAME_RE),
        _str(doc, "source", HOST_RE), _str(doc, "dest", HOST_RE), doc["kind"],
    )  # fmt: skip


@attrs.frozen
class Grant:
    id: str
    state: State
    reason: str
    host: str

    def to_json(self) -> str:
        return json.dumps(
            {"id": self.id, "state": self.state.value, "reason": self.reason, "host": self.host},
            sort_keys=True,
        )


def parse_grant(text: str) -> Grant:
    doc = json_object(text, "grant", 8192)
    if doc.get("state") not in ("granted", "refused"):
        raise RecordError("grant: state must be granted or refused")
    reason = doc.get("reason")
    if not isinstance(reason, str):
        raise RecordError("grant: reason is not a string")
    return Grant(
        _str(doc, "id", ID_RE), State(doc["state"]), reason[:2000], _str(doc, "host", HOST_RE)
    )
