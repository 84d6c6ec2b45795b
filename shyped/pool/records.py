"""The JSON records pool mode keeps in etcd (pure): the versioned pool policy, a policy
proposal and each host's answer, a host's published state, and the rule that commits a
proposal. Every record is read as untrusted input: exact types, bounded sizes and counts;
anything else is `RecordError` (and ignored or refused by the caller, never half-used).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

#: Longest policy text kept in etcd (etcd refuses requests over 1.5 MiB by default).
MAX_POLICY_TEXT: Final = 1024 * 1024
#: Most reasons one host's answer may carry, and the longest reason.
MAX_PROBLEMS: Final = 200
MAX_PROBLEM_CHARS: Final = 2000
#: Most labels a host's published state may name.
MAX_HOST_LABELS: Final = 10_000

#: The shapes every pool record's fields are checked against (shared by the pool modules).
ID_RE: Final = re.compile(r"^[0-9a-f]{32}\Z")
SHA_RE: Final = re.compile(r"^[0-9a-f]{64}\Z")
NAME_RE: Final = re.compile(r"^[A-Za-z0-9_.-][A-Za-z0-9_.+-]{0,127}\Z")
HOST_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")


class RecordError(ValueError):
    """A record that cannot be used (the message says why)."""


def json_object(text: str, what: str, limit: int = MAX_POLICY_TEXT + 64 * 1024) -> dict[str, Any]:
    if len(text) > limit:
        raise RecordError(f"{what}: longer than {limit} characters")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise RecordError(f"{what}: not JSON") from None
    if not isinstance(doc, dict):
        raise RecordError(f"{what}: not an object")
    return doc


def field(doc: Mapping[str, Any], key: str, kind: type, what: str) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RecordError(f"{what}: {key} must be a {kind.__name__}")
    return value


def matching(value: str, pattern: re.Pattern[str], key: str, what: str) -> str:
    if not pattern.fullmatch(value):
        raise RecordError(f"{what}: {key} {value[:80]!r} is not valid")
    return value


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@attrs.frozen
class PolicyRecord:
    """The pool's policy: ``seq`` counts committed switches; the text and its sha256."""

    seq: int
    sha256: str
    text: str
    filename: str
    proposal: str

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), sort_keys=True)


def parse_policy_record(text: str) -> PolicyRecord:
    what = "pool policy record"
    doc = json_object(text, what)
    rec = PolicyRecord(
        seq=field(doc, "seq", int, what),
        sha256=matching(field(doc, "sha256", str, what), SHA_RE, "sha256", what),
        text=field(doc, "text", str, what),
        filename=field(doc, "filename", str, what)[:200],
        proposal=matching(field(doc, "proposal", str, what), ID_RE, "proposal", what),
    )
    if rec.seq < 1 or len(rec.text) > MAX_POLICY_TEXT or sha256_text(rec.text) != rec.sha256:
        raise RecordError(f"{what}: seq, size or sha256 does not hold")
    return rec


@attrs.frozen
class Proposal:
    """A proposed switch: the text, and the policy seq it would replace (0: none yet)."""

    id: str
    sha256: str
    text: str
    filename: str
    proposer: str
    base_seq: int

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), sort_keys=True)


def parse_proposal(text: str) -> Proposal:
    what = "pool policy proposal"
    doc = json_object(text, what)
    p = Proposal(
        id=matching(field(doc, "id", str, what), ID_RE, "id", what),
        sha256=matching(field(doc, "sha256", str, what), SHA_RE, "sha256", what),
        text=field(doc, "text", str, what),
        filename=field(doc, "filename", str, what)[:200],
        proposer=matching(field(doc, "proposer", str, what), HOST_RE, "proposer", what),
        base_seq=field(doc, "base_seq", int, what),
    )
    if p.base_seq < 0 or len(p.text) > MAX_POLICY_TEXT or sha256_text(p.text) != p.sha256:
        raise RecordError(f"{what}: base_seq, size or sha256 does not hold")
    return p


@attrs.frozen
class Answer:
    """One host's answer to a proposal: accepted, or the reasons its running set refuses."""

    host: str
    accept: bool
    problems: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(
            {"host": self.host, "accept": self.accept, "problems": list(self.problems)},
            sort_keys=True,
        )


def parse_answer(text: str) -> Answer:
    what = "pool policy answer"
    doc = json_object(text, what, 1024 * 1024)
    problems = field(doc, "problems", list, what)
    if len(problems) > MAX_PROBLEMS or not all(isinstance(p, str) for p in problems):
        raise RecordError(f"{what}: problems must be at most {MAX_PROBLEMS} strings")
    return Answer(
        host=matching(field(doc, "host", str, what), HOST_RE, "host", what),
        accept=field(doc, "accept", bool, what),
        problems=tuple(p[:MAX_PROBLEM_CHARS] for p in problems),
    )


@attrs.frozen
class Verdict:
    """Whether a proposal commits: every live host answered and accepted."""

    commit: bool
    #: host -> its reasons (refusals, or "no answer"); empty for a host that accepted
    reasons: dict[str, tuple[str, ...]]


def verdict(live_hosts: frozenset[str], answers: Mapping[str, Answer]) -> Verdict:
    """Commit only if every live host answered and accepted (a host that is not live does not
    count; one that did not answer refuses)."""
    reasons: dict[str, tuple[str, ...]] = {}
    for host in sorted(live_hosts):
        ans = answers.get(host)
        if ans is None:
            reasons[host] = ("no answer in time (the host did not check the proposal)",)
        elif not ans.accept:
            reasons[host] = ans.problems or ("refused",)
    return Verdict(bool(live_hosts) and not reasons, reasons)


@attrs.frozen
class HostState:
    """A live host's published state (untrusted: it only informs placement)."""

    host: str
    running_labels: dict[str, int]
    policy_sha256: str


def parse_host_state(text: str) -> HostState:
    what = "pool host state"
    doc = json_object(text, what, 4 * 1024 * 1024)
    labels = field(doc, "running_labels", dict, what)
    if len(labels) > MAX_HOST_LABELS or not all(
        isinstance(k, str) and NAME_RE.fullmatch(k) and type(v) is int and 0 < v < 1 << 31
        for k, v in labels.items()
    ):
        raise RecordError(f"{what}: running_labels must map label names to counts")
    policy = field(doc, "policy", dict, what)
    return HostState(
        host=matching(field(doc, "host", str, what), HOST_RE, "host", what),
        running_labels=dict(labels),
        policy_sha256=matching(field(policy, "sha256", str, what), SHA_RE, "policy.sha256", what),
    )
