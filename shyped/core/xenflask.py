"""Xen's FLASK as the daemon sees it (pure): its mode, its text read as untrusted input, and
what to do about a domain's context.

Everything here reads text that came from Xen's console ring or ``xl list -Z``: bounded, parsed
strictly, anything that does not fit is dropped (and counted by the caller), never guessed at.
The edge (`shyped.service.flaskxen`) does the I/O.

- `parse_avc_line`: one line of Xen's console ring (``xl dmesg``) → `AvcRecord`, or None. Xen
  writes its own lines with the prefix ``(XEN)`` (``printk_start_of_line``) and a guest's
  console writes with ``(d<N>)`` on every line (``guest_console_write``), so only ``(XEN)``
  lines count: a guest cannot forge a denial (dom0's kernel writes unprefixed and is trusted,
  and its unprefixed lines are ignored too).
- `parse_list_z`: ``xl list -Z`` → domid → context.
- `plan_domain`: the context a domain must run with in Xen and the one it has → nothing to do,
  relabel it (only from unlabelled), or refuse (veto) it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from typing import Final

import attrs

from shyped.policy.flask import CONTEXT_PREFIX, UNLABELLED_ALIASES, UNLABELLED_TYPE

#: Xen's AVC line buffer (``AVC_BUF_SIZE`` in xen/xsm/flask/avc.c); longer lines are not Xen's.
MAX_AVC_LINE: Final = 1024
#: A FLASK context as shyped reads it (Xen's own are far shorter).
MAX_CONTEXT: Final = 256
#: Permissions named in one AVC line (Xen's largest class has 32 bits).
MAX_PERMS: Final = 32
#: Lines of ``xl list -Z`` read (a host runs at most a few thousand domains).
MAX_LIST_LINES: Final = 65536
#: A line of ``xl list -Z``.
MAX_LIST_LINE: Final = 4096
#: Xen's object classes (xen/xsm/flask/policy/security_classes): a metric label takes one of
#: these or "other".
XEN_CLASSES: Final = frozenset(
    {
        "xen", "xen2", "domain", "domain2", "hvm", "mmu", "resource", "shadow", "event",
        "grant", "security", "version", "argo",
    }
)  # fmt: skip


class FlaskMode(enum.StrEnum):
    """Xen's FLASK as detected at start."""

    ENFORCING = "enforcing"
    PERMISSIVE = "permissive"
    #: No XSM/FLASK in this hypervisor (Debian's Xen), or no hypervisor (the sandbox).
    ABSENT = "absent"

    @property
    def present(self) -> bool:
        return self is not FlaskMode.ABSENT


_CONTEXT = re.compile(
    r"[A-Za-z0-9_]{1,64}:[A-Za-z0-9_]{1,64}:[A-Za-z0-9_]{1,120}(:[A-Za-z0-9_.,:-]{1,64})?"
)
_WORD = re.compile(r"[a-z0-9_]{1,32}")
_HEX = re.compile(r"0x[0-9a-f]{1,8}")
#: ``(XEN) `` then Xen's optional timestamp (``[...] ``), then the AVC text.
_AVC = re.compile(
    r"\(XEN\) (?:\[[0-9 .:-]{1,40}\] )?avc: {1,2}(denied|granted) {1,2}"
    r"\{((?: [^ {}]+){1,32}) \} for (.*)"
)
#: ``%pd``: ``d<N>``, or ``d[IDLE]`` and friends for system domains.
_DOMREF = re.compile(r"d([0-9]{1,5})|d\[[A-Z]{1,8}\]")
_KEYS: Final = frozenset(
    {"source", "target", "current", "scontext", "tcontext", "ssid", "tsid", "tclass"}
    | {"device", "irq", "range", "pte", "mfn", "dtdevice"}
)


def valid_context(text: str) -> bool:
    """A FLASK context in the shape Xen prints it (``user:role:type[:mls]``), bounded."""
    return len(text) <= MAX_CONTEXT and _CONTEXT.fullmatch(text) is not None


def context_type(text: str) -> str | None:
    """The type of a valid context, else None."""
    return text.split(":")[2] if valid_context(text) else None


@attrs.frozen
class AvcRecord:
    """One AVC message of Xen's console ring, every field checked."""

    denied: bool
    perms: tuple[str, ...]
    tclass: str
    scontext: str | None = None
    tcontext: str | None = None
    source: int | None = None  #: domid, when Xen named the domains (``source=d<N>``)
    target: int | None = None
    current: int | None = None  #: the calling domain, when Xen named no source/target

    @property
    def metric_class(self) -> str:
        return self.tclass if self.tclass in XEN_CLASSES else "other"

    def details(self) -> dict[str, object]:
        """The audit record's fields."""
        out: dict[str, object] = {
            "verdict": "denied" if self.denied else "granted",
            "perms": list(self.perms),
            "tclass": self.tclass,
        }
        for key in ("scontext", "tcontext", "source", "target", "current"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


def _domid(text: str) -> tuple[bool, int | None]:
    m = _DOMREF.fullmatch(text)
    if m is None:
        return False, None
    return True, int(m.group(1)) if m.group(1) is not None else None


def parse_avc_line(line: str) -> AvcRecord | None:
    """`line` (one line of Xen's console ring) as an AVC record, or None if it is not one.

    Strict: Xen's prefix, ``avc:  denied|granted  { perms } for key=value …``, every key
    known and every value in its shape (contexts, ``d<N>`` domids, class names). Anything
    else (a guest's ``(d1)`` line, garbage, an overlong line) is None.
    """
    if len(line) > MAX_AVC_LINE:
        return None
    m = _AVC.fullmatch(line.rstrip("\r\n"))
    if m is None:
        return None
    perms = tuple(m.group(2).split())
    if not all(_WORD.fullmatch(p) or _HEX.fullmatch(p) for p in perms):
        return None
    fields: dict[str, str] = {}
    for item in m.group(3).split():
        key, sep, value = item.partition("=")
        if not sep or key not in _KEYS or key in fields:
            return None
        fields[key] = value
    tclass = fields.get("tclass")
    if tclass is None or not _WORD.fullmatch(tclass):
        return None
    ctx: dict[str, str | None] = {}
    for key in ("scontext", "tcontext"):
        value = fields.get(key)
        if value is not None and not valid_context(value):
            return None
        ctx[key] = value
    doms: dict[str, int | None] = {}
    for key in ("source", "target", "current"):
        value = fields.get(key)
        if value is None:
            doms[key] = None
            continue
        ok, domid = _domid(value)
        if not ok:
            return None
        doms[key] = domid
    return AvcRecord(
        denied=m.group(1) == "denied",
        perms=perms,
        tclass=tclass,
        scontext=ctx["scontext"],
        tcontext=ctx["tcontext"],
        **doms,
    )


@attrs.frozen
class ConsoleRead:
    """What one read of the console ring gave: AVC records, lines that were not, the last
    line if it was cut (kept for the next read), and whether the next read starts inside a
    line whose head was dropped (then its text up to the first newline is not read)."""

    records: tuple[AvcRecord, ...]
    lines: int
    rest: str
    skipping: bool = False


def ring_gap(requested: int, end: int, nbytes: int) -> bool:
    """Whether Xen's ``read_console_ring`` (incremental) did not start at `requested`: it
    returns the index after the `nbytes` it copied, and starts at the oldest byte it still
    holds when `requested` was overwritten (a flood between two reads), in mid-line."""
    return (end - nbytes) & 0xFFFFFFFF != requested & 0xFFFFFFFF


def read_console(
    previous: str, text: str, *, skip: bool = False, max_rest: int = MAX_AVC_LINE
) -> ConsoleRead:
    """Split `previous` (an unfinished line of the last read) + `text` into lines and parse
    the AVC ones; an unfinished last line is returned as `rest` (dropped past `max_rest`).

    `skip`: `text` starts in the middle of a line (the ring overwrote what came before, or
    the line's head was dropped as too long): `previous` and everything up to the first
    newline are dropped, as the tail of a line is whatever the line held (a guest's
    ``(d<N>) …(XEN) avc: …`` would read as Xen's own denial).
    """
    dropped = 0
    if skip:
        _, newline, text = text.partition("\n")
        if not newline:
            return ConsoleRead((), 0, "", skipping=True)
        previous, dropped = "", 1
    parts = (previous + text).split("\n")
    rest = parts.pop()
    skipping = len(rest) > max_rest
    if skipping:
        rest = ""
    records = [r for line in parts if (r := parse_avc_line(line)) is not None]
    return ConsoleRead(tuple(records), len(parts) + dropped, rest, skipping)


@attrs.frozen
class ListedDomain:
    """One row of ``xl list -Z``."""

    domid: int
    name: str
    context: str | None  #: None: xl printed no valid context ("-": no XSM)


def parse_list_z(text: str) -> dict[int, ListedDomain]:
    """``xl list -Z``'s rows by domid. Columns are read from the right (a name may hold
    spaces): name, ID, Mem, VCPUs, State, Time(s), Security Label. A row that does not fit,
    or a domid seen twice, is dropped (both rows: fail closed, such a domain has no trusted
    context)."""
    out: dict[int, ListedDomain] = {}
    twice: set[int] = set()
    for line in text.splitlines()[:MAX_LIST_LINES]:
        if len(line) > MAX_LIST_LINE or line.startswith("Name "):
            continue
        cols = line.rsplit(None, 6)
        if len(cols) != 7 or not cols[1].isascii() or not cols[1].isdigit():
            continue
        domid = int(cols[1])
        if domid > 0x7FEF:  # DOMID_FIRST_RESERVED
            continue
        context = cols[6] if valid_context(cols[6]) else None
        if domid in out:
            twice.add(domid)
        out[domid] = ListedDomain(domid, cols[0].strip(), context)
    for domid in twice:
        del out[domid]
    return out


class Step(enum.StrEnum):
    """What the daemon does about a domain's context in Xen."""

    NONE = "none"  #: it runs with the context its label gives
    RELABEL = "relabel"  #: unlabelled in Xen: relabel it to its label's context
    REFUSE = "refuse"  #: anything else: veto it


@attrs.frozen
class DomainPlan:
    step: Step
    want: str
    have: str | None
    reason: str = ""


def unlabelled_context(context: str) -> bool:
    """A context of a domain built without ``seclabel=`` (Xen's domU/domDM initial SIDs)."""
    return context_type(context) in {UNLABELLED_TYPE, *UNLABELLED_ALIASES}


def plan_domain(want: str, have: str | None) -> DomainPlan:
    """What to do for a domain that must run with context `want` and runs with `have` in Xen
    (None: Xen does not list it, or with no context shyped can read): refuse unless it has
    `want` already or is unlabelled there (then relabel). A domain relabelled from another
    label is refused: Xen's policy does not let dom0 relabel it (docs/flask.md)."""
    if have is None:
        return DomainPlan(Step.REFUSE, want, None, "Xen lists no readable context for it")
    if have == want:
        return DomainPlan(Step.NONE, want, have)
    if unlabelled_context(have) and have.startswith(CONTEXT_PREFIX):
        return DomainPlan(Step.RELABEL, want, have, f"unlabelled in Xen: relabel to {want}")
    return DomainPlan(Step.REFUSE, want, have, f"runs in Xen as {have}, not as its label's {want}")


def denial_summary(records: Iterable[AvcRecord]) -> dict[str, int]:
    """Denials by metric class (for a summary of records not written in full)."""
    out: dict[str, int] = {}
    for r in records:
        if r.denied:
            out[r.metric_class] = out.get(r.metric_class, 0) + 1
    return out


def plan_running_relabel(old: str, new: str, have: str | None) -> DomainPlan:
    """What to do in Xen when the daemon relabels a running domain from context `old` to
    `new` and Xen lists it with `have` (None: no readable context): nothing when it has `new`
    already, relabel when it has `old`; anything else means Xen and the daemon disagree
    already, and the relabel is refused (fail closed: the daemon changes nothing either)."""
    if have is None:
        return DomainPlan(Step.REFUSE, new, None, "Xen lists no readable context for it")
    if have == new:
        return DomainPlan(Step.NONE, new, have)
    if have == old:
        return DomainPlan(Step.RELABEL, new, have, f"relabel from {old} to {new}")
    return DomainPlan(Step.REFUSE, new, have, f"runs in Xen as {have}, not as its label's {old}")
