"""Measurement events, the measurement log and its replay to a PCR value.

An event is a JSON object (``v``, the format version, ``kind`` and the facts measured); its
digest is the sha256 of its canonical JSON (sorted keys, no spaces, ASCII). Each event is
extended into one SHA-256 PCR: ``new = sha256(old || digest)``, starting from the PCR's reset
value (32 zero bytes). The log holds one line per event::

    {"seq": 0, "digest": "<hex>", "event": {"v": 2, "kind": "start", ...}}

so that a verifier recomputes every digest from its event and replays the PCR.

Format 2 (this one) measures the label store by its digest (``labels_sha256``: the sha256 of
its canonical JSON), never the store itself, so that every entry is small and bounded
(`MAX_ENTRY_BYTES`) whatever the number of labelled domains; the quote's state report carries
the store, which the verifier checks against the last measured digest. Format 1 (no ``v``)
measured the whole store in every ``labels`` event: 2,000 labelled domains filled a 16 MiB log
in ~160 label changes. It is refused by name (`check_entries`), never read as format 2.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

#: The kinds of event shyped measures (docs/attestation.md).
START: Final = "start"  #: daemon start: policy, mode, label store (the PCR was reset or not)
POLICY: Final = "policy"  #: a policy switch took effect
LABELS: Final = "labels"  #: the label store in use changed
MODE: Final = "mode"  #: enforcing <-> permissive
AUDIT_ROTATION: Final = "audit-rotation"  #: the audit log rotated (the chain head then)
KINDS: Final = (START, POLICY, LABELS, MODE, AUDIT_ROTATION)

#: The measurement format version every event carries as ``v`` (the module docstring).
VERSION: Final = 2

PCR_RESET: Final = bytes(32)
#: Bound on one log line as written: an event measures digests and short names only.
MAX_ENTRY_BYTES: Final = 1024
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


def labels_digest(labels: Mapping[str, Any]) -> str:
    """The hex sha256 of a label store's canonical JSON (`LabelStore.to_json`'s document):
    what format 2 measures of it."""
    return hashlib.sha256(canonical(labels)).hexdigest()


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
    """An entry for `event` (given its ``v`` if it has none); a ValueError for an unknown kind
    or an entry longer than `MAX_ENTRY_BYTES` (the caller fails closed: nothing measured)."""
    if event.get("kind") not in KINDS:
        raise ValueError(f"unknown measurement kind {event.get('kind')!r}")
    event = {"v": VERSION, **event}
    entry = Entry(seq, event, digest(event))
    if len(entry.line()) > MAX_ENTRY_BYTES:
        raise ValueError(
            f"a {event['kind']!r} measurement would take {len(entry.line())} bytes, more than "
            f"{MAX_ENTRY_BYTES}"
        )
    return entry


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


def entry_problems(index: int, e: Entry) -> list[str]:
    """What is wrong with log entry number `index` itself (see `check_entries`)."""
    version = e.event.get("v")
    if version != VERSION:
        return [_version_problem(index, version)]
    problems: list[str] = []
    if e.seq != index:
        problems.append(f"log entry {index}: seq {e.seq}, expected {index} (an entry is missing)")
    if digest(e.event) != e.digest:
        problems.append(
            f"log entry {index} ({e.event.get('kind')!r}): its digest does not match its "
            "event (the entry was edited)"
        )
    if e.event.get("kind") not in KINDS:
        problems.append(f"log entry {index}: unknown kind {e.event.get('kind')!r}")
    if index == 0 and e.event.get("kind") != START:
        problems.append("log entry 0 is not a start event")
    return problems


def check_entries(entries: Iterable[Entry]) -> list[str]:
    """What is wrong with the log itself: sequence gaps, digests that do not cover their
    event, a first event that is not a start."""
    return [p for i, e in enumerate(entries) for p in entry_problems(i, e)]


def _version_problem(index: int, version: Any) -> str:
    if version is None:
        return (
            f"log entry {index}: measurement format 1 (no 'v': whole label stores, written by "
            f"an older shyped), this verifier reads format {VERSION} only: quote again after "
            "the host rebooted into this version"
        )
    return (
        f"log entry {index}: unknown measurement format {version!r}, this verifier reads "
        f"format {VERSION} only"
    )


def log_versions(entries: Iterable[Entry]) -> str | None:
    """Why a log cannot be continued in this format (an entry of another version), or None."""
    for i, e in enumerate(entries):
        if e.event.get("v") != VERSION:
            return _version_problem(i, e.event.get("v"))
    return None


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
    labels_sha256: str | None = None  #: `labels_digest` of the store in use
    audit_rotation: Mapping[str, Any] | None = None
    starts: int = 0


class LogFold:
    """One pass over a log, an entry at a time (none kept): its problems (`entry_problems`),
    the PCR value it replays to (`replay`) and what it says is in force (`measured_state`).
    The verifier folds a bundle's log through it, so that only one parsed entry is alive at a
    time (docs/attestation.md, *Bounded input*)."""

    def __init__(self, start: bytes = PCR_RESET) -> None:
        self.problems: list[str] = []
        self.pcr = start
        self.count = 0
        self._policy: Mapping[str, Any] | None = None
        self._mode: str | None = None
        self._labels: str | None = None
        self._rotation: Mapping[str, Any] | None = None
        self._starts = 0

    def feed(self, e: Entry, check: bool = True) -> None:
        if check:
            self.problems.extend(entry_problems(self.count, e))
        self.count += 1
        self.pcr = extend(self.pcr, e.digest)
        ev = e.event
        kind = ev.get("kind")
        if kind == START:  # a new daemon run counts its rotations afresh
            self._starts += 1
            self._rotation = None
        if kind in (START, POLICY) and isinstance(ev.get("policy"), dict):
            self._policy = ev["policy"]
        if kind in (START, MODE) and isinstance(ev.get("mode"), str):
            self._mode = ev["mode"]
        if kind in (START, LABELS) and isinstance(ev.get("labels_sha256"), str):
            self._labels = ev["labels_sha256"]
        if kind == AUDIT_ROTATION:
            self._rotation = ev

    def measured(self) -> Measured:
        return Measured(self._policy, self._mode, self._labels, self._rotation, self._starts)


def measured_state(entries: Iterable[Entry]) -> Measured:
    fold = LogFold()
    for e in entries:
        fold.feed(e, check=False)
    return fold.measured()


def events_for(
    last: Measured | None,
    *,
    policy: Mapping[str, Any],
    mode: str,
    labels: str,
    rotations: int,
    audit_head: Mapping[str, Any] | None,
) -> list[dict[str, Any]]:
    """The events that bring the measured state `last` (None: nothing measured since the
    daemon started) to the current one, in order. `labels` is the store's `labels_digest`."""
    if last is None:
        return [{"kind": START, "policy": dict(policy), "mode": mode, "labels_sha256": labels}]
    out: list[dict[str, Any]] = []
    if last.policy != policy:
        out.append({"kind": POLICY, "policy": dict(policy)})
    if last.labels_sha256 != labels:
        out.append({"kind": LABELS, "labels_sha256": labels})
    if last.mode != mode:
        out.append({"kind": MODE, "mode": mode})
    seen = 0 if last.audit_rotation is None else int(last.audit_rotation.get("rotations", 0))
    if rotations > seen:
        out.append({"kind": AUDIT_ROTATION, "rotations": rotations, "head": audit_head})
    return out
