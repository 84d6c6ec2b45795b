"""Measurement events, the measurement log and its replay to a PCR value.

An event is a JSON object (``kind`` plus the facts measured); its digest is the sha256 of its
canonical JSON (sorted keys, no spaces, ASCII). Each event is extended into one SHA-256 PCR:
``new = sha256(old || digest)``, starting from the PCR's reset value (32 zero bytes). The log
holds one line per event::

    {"seq": 0, "digest": "<hex>", "event": {"kind": "start", ...}}

so that a verifier recomputes every digest from its event and replays the PCR.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import attrs

#: The kinds of event shyped measures (docs/attestation.md).
START: Final = "start"  #: daemon start: policy, mode, label store (the PCR was reset or not)
POLICY: Final = "policy"  #: a policy switch took effect
LABELS: Final = "labels"  #: the label store in use changed
MODE: Final = "mode"  #: enforcing <-> permissive
AUDIT_ROTATION: Final = "audit-rotation"  #: the audit log rotated (the chain head then)
KINDS: Final = (START, POLICY, LABELS, MODE, AUDIT_ROTATION)

PCR_RESET: Final = bytes(32)
#: Bounds on what a verifier reads: a log line, the number of lines.
MAX_LINE_BYTES: Final = 1 << 20
MAX_EVENTS: Final = 1_000_000


class LogError(Exception):
    """A measurement log line that cannot be used (with its line number)."""


def canonical(value: Mapping[str, Any]) -> bytes:
    """The canonical JSON bytes of an event: what its digest covers."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def digest(event: Mapping[str, Any]) -> bytes:
    return hashlib.sha256(canonical(event)).digest()


def extend(pcr: bytes, event_digest: bytes) -> bytes:
    """The TPM's extend for a SHA-256 bank."""
    return hashlib.sha256(pcr + event_digest).digest()


@attrs.frozen
class Entry:
    """One measured event as the log holds it."""

    seq: int
    event: Mapping[str, Any]
    digest: bytes

    def line(self) -> bytes:
        doc = {"seq": self.seq, "digest": self.digest.hex(), "event": dict(self.event)}
        return canonical(doc) + b"\n"


def make_entry(seq: int, event: Mapping[str, Any]) -> Entry:
    if event.get("kind") not in KINDS:
        raise ValueError(f"unknown measurement kind {event.get('kind')!r}")
    return Entry(seq, dict(event), digest(event))


def parse_line(line: bytes | str, number: int) -> Entry:
    """One log line as written (not yet checked against its digest: see `check_entries`)."""
    raw = line.encode() if isinstance(line, str) else line
    if len(raw) > MAX_LINE_BYTES:
        raise LogError(f"line {number}: longer than {MAX_LINE_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise LogError(f"line {number}: not JSON ({e})") from None
    if not isinstance(doc, dict) or set(doc) != {"seq", "digest", "event"}:
        raise LogError(f"line {number}: not a measurement (keys seq, digest, event)")
    seq, hexdigest, event = doc["seq"], doc["digest"], doc["event"]
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(event, dict):
        raise LogError(f"line {number}: seq must be an integer and event an object")
    try:
        value = bytes.fromhex(hexdigest) if isinstance(hexdigest, str) else b""
    except ValueError:
        value = b""
    if len(value) != 32:
        raise LogError(f"line {number}: digest must be 64 hex digits")
    return Entry(seq, event, value)


def parse_log(lines: Iterable[bytes | str]) -> list[Entry]:
    entries: list[Entry] = []
    for number, line in enumerate(lines, 1):
        if number > MAX_EVENTS:
            raise LogError(f"more than {MAX_EVENTS} events")
        if isinstance(line, (bytes, str)) and not line.strip():
            continue
        entries.append(parse_line(line, number))
    return entries


def check_entries(entries: Sequence[Entry]) -> list[str]:
    """What is wrong with the log itself: sequence gaps, digests that do not cover their
    event, a first event that is not a start."""
    problems: list[str] = []
    for i, e in enumerate(entries):
        if e.seq != i:
            problems.append(f"log entry {i}: seq {e.seq}, expected {i} (an entry is missing)")
        if digest(e.event) != e.digest:
            problems.append(
                f"log entry {i} ({e.event.get('kind')!r}): its digest does not match its "
                "event (the entry was edited)"
            )
        if e.event.get("kind") not in KINDS:
            problems.append(f"log entry {i}: unknown kind {e.event.get('kind')!r}")
    if entries and entries[0].event.get("kind") != START:
        problems.append("log entry 0 is not a start event")
    return problems


def replay(entries: Iterable[Entry], start: bytes = PCR_RESET) -> bytes:
    """The PCR value after extending each entry's digest (as logged) from `start`."""
    pcr = start
    for e in entries:
        pcr = extend(pcr, e.digest)
    return pcr


@attrs.frozen
class Measured:
    """What the log says is in force after its last event."""

    policy: Mapping[str, Any] | None = None
    mode: str | None = None
    labels: Mapping[str, Any] | None = None
    audit_rotation: Mapping[str, Any] | None = None
    starts: int = 0


def measured_state(entries: Iterable[Entry]) -> Measured:
    policy: Mapping[str, Any] | None = None
    mode: str | None = None
    labels: Mapping[str, Any] | None = None
    rotation: Mapping[str, Any] | None = None
    starts = 0
    for e in entries:
        ev = e.event
        kind = ev.get("kind")
        if kind == START:  # a new daemon run counts its rotations afresh
            starts += 1
            rotation = None
        if kind in (START, POLICY) and isinstance(ev.get("policy"), dict):
            policy = ev["policy"]
        if kind in (START, MODE) and isinstance(ev.get("mode"), str):
            mode = ev["mode"]
        if kind in (START, LABELS, POLICY) and isinstance(ev.get("labels"), dict):
            labels = ev["labels"]
        if kind == AUDIT_ROTATION:
            rotation = ev
    return Measured(policy, mode, labels, rotation, starts)


def events_for(
    last: Measured | None,
    *,
    policy: Mapping[str, Any],
    mode: str,
    labels: Mapping[str, Any],
    rotations: int,
    audit_head: Mapping[str, Any] | None,
) -> list[dict[str, Any]]:
    """The events that bring the measured state `last` (None: nothing measured since the
    daemon started) to the current one, in order."""
    if last is None:
        return [{"kind": START, "policy": dict(policy), "mode": mode, "labels": dict(labels)}]
    out: list[dict[str, Any]] = []
    if last.policy != policy:
        out.append({"kind": POLICY, "policy": dict(policy)})
    if last.labels != labels:
        out.append({"kind": LABELS, "labels": dict(labels)})
    if last.mode != mode:
        out.append({"kind": MODE, "mode": mode})
    seen = 0 if last.audit_rotation is None else int(last.audit_rotation.get("rotations", 0))
    if rotations > seen:
        out.append({"kind": AUDIT_ROTATION, "rotations": rotations, "head": audit_head})
    return out
