"""The off-host audit anchor (pure): a host's audit chain head as kept in etcd
(``P/audit/<host>``), and the check of a local chain against it.

A rewritten log (and state file) is caught when the record the anchor names (log id, seq) is
missing from the local files or carries another hash. What was appended after the last anchor
is not covered: the anchor interval bounds what a rewrite can hide (docs/pool.md).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

import attrs

from shyped.core.audit import Record
from shyped.pool.records import RecordError, json_object

_HEX = re.compile(r"^[0-9a-f]{16,128}\Z")


class AnchorError(ValueError):
    """An anchor record that cannot be used."""


@attrs.frozen
class AuditAnchor:
    host: str
    log: str
    seq: int
    hash: str
    time: float

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), sort_keys=True)


def parse_anchor(text: str) -> AuditAnchor:
    try:
        doc = json_object(text, "audit anchor", 4096)
    except RecordError as exc:
        raise AnchorError(str(exc)) from None
    host, log, seq, hsh, when = (doc.get(k) for k in ("host", "log", "seq", "hash", "time"))
    if (
        not isinstance(host, str)
        or not isinstance(log, str)
        or not _HEX.fullmatch(log)
        or not isinstance(seq, int)
        or isinstance(seq, bool)
        or seq < 0
        or not isinstance(hsh, str)
        or not _HEX.fullmatch(hsh)
        or not isinstance(when, int | float)
    ):
        raise AnchorError("audit anchor: host, log, seq, hash or time is not valid")
    return AuditAnchor(host[:64], log, seq, hsh, float(when))


def check_anchor(records: Iterable[Record], anchor: AuditAnchor) -> tuple[str, ...]:
    """Problems of the local `records` against `anchor` (empty: the anchored head is there)."""
    same_log = False
    for rec in records:
        if rec.log != anchor.log:
            continue
        same_log = True
        if rec.seq == anchor.seq:
            if rec.hash != anchor.hash:
                return (
                    f"record seq {anchor.seq} of log {anchor.log[:16]} has hash {rec.hash[:16]}, "
                    f"the pool's anchor says {anchor.hash[:16]}: the local log was rewritten",
                )
            return ()
    if not same_log:
        return (
            f"the anchored log {anchor.log[:16]} (head seq {anchor.seq}) is not in the local "
            "files: the log was replaced",
        )
    return (
        f"the anchored record seq {anchor.seq} of log {anchor.log[:16]} is missing locally: "
        "the log was cut or rewritten",
    )
