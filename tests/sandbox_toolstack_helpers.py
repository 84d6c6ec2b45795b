"""Helpers for the sandbox toolstack tests: the reference capture, xenstore-ls dumps, and
oxenstored access logs reduced to transactions."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import attrs

from shyped.sandbox.xenstored import SandboxXenstored

REFERENCE = Path(__file__).parent / "reference"
XSGOLD_CFG = REFERENCE / "xsgold.cfg"

#: Values that differ between two real runs of the same capture (compare-repeat.txt and
#: compare-cxenstored.txt in shared/xen-4.17-reference), and only those:
#: - start_time: wall clock at libxl__domain_build;
#: - store/ring-ref and console/ring-ref: machine frame numbers chosen by the domain builder
#:   (they differed between the oxenstored and the C xenstored runs).
VARYING_VALUES = (
    (re.compile(r"^/vm/[^/]+/start_time$"), "<start_time: wall clock at build>"),
    (re.compile(r"^/local/domain/\d+/store/ring-ref$"), "<store mfn>"),
    (re.compile(r"^/local/domain/\d+/console/ring-ref$"), "<console mfn>"),
)

_LS_LINE = re.compile(r'^(?P<path>\S+) = "(?P<value>.*)"   \((?P<perms>[^)]*)\)$')


def xenstore_ls(xsd: SandboxXenstored) -> str:
    """Debian's `xenstore-ls -fp` against the instance (what the capture ran)."""
    tool = shutil.which("xenstore-ls")
    assert tool is not None, "xenstore-ls (Debian xenstore-utils) is required"
    result = subprocess.run(
        [tool, "-fp"], env=xsd.env(), capture_output=True, text=True, check=True
    )
    return result.stdout


def normalize_layout(text: str) -> list[str]:
    """xenstore-ls -fp lines with only the VARYING_VALUES replaced by placeholders."""
    out = []
    for line in text.splitlines():
        m = _LS_LINE.match(line)
        assert m, f"unexpected xenstore-ls line {line!r}"
        value = m["value"]
        for pattern, placeholder in VARYING_VALUES:
            if pattern.match(m["path"]):
                value = placeholder
        out.append(f'{m["path"]} = "{value}"   ({m["perms"]})')
    return out


def reference_layout(name: str) -> list[str]:
    return normalize_layout((REFERENCE / name).read_text())


# -- access logs ---------------------------------------------------------------------------

MUTATIONS = ("write", "setperms", "rm", "mkdir")


@attrs.frozen
class LogOp:
    conn: str  # "A9", "D0", "r(1):A5" (oxenstored replay)
    tx: int  # 0 outside a transaction
    op: str
    path: str
    value: str


@attrs.frozen
class Unit:
    """What a reader of the log sees as one change: a committed transaction or a plain op."""

    in_transaction: bool
    ops: tuple[tuple[str, str, str], ...]  # (op, absolute path, value)


_ACCESS = re.compile(r"^\[[^\]]+\]\s+(?P<conn>\S+?)(?:\.(?P<tx>\d+))?\s+(?P<op>.*)$")
_PHASE_LINE = re.compile(r"^\s*\d+\s+(?P<conn>\S+?)(?:\.(?P<tx>\d+))?\s+(?P<op>.*)$")


def _split(rest: str) -> tuple[str, str, str] | None:
    for op in ("t start", "t end", "commit", "conflict", *MUTATIONS):
        if rest.startswith(op):
            tail = rest[len(op) :].strip(" ")
            path, _, value = tail.partition(" ")
            return op, path, value.rstrip(" ") if op != "write" else value
    return None


def parse_access_log(lines: Iterable[str], *, phase_file: bool = False) -> list[LogOp]:
    """Lines of oxenstored's access log (or of the capture's writes-by-phase.txt)."""
    pattern = _PHASE_LINE if phase_file else _ACCESS
    ops = []
    for line in lines:
        m = pattern.match(line)
        if not m:
            continue
        split = _split(m["op"])
        if split is None:
            continue
        op, path, value = split
        ops.append(LogOp(m["conn"], int(m["tx"] or 0), op, path, value))
    return ops


def reference_phase(phase: str) -> list[LogOp]:
    """One phase of the capture's writes-by-phase.txt."""
    lines: list[str] = []
    current = None
    for line in (REFERENCE / "writes-by-phase.txt").read_text().splitlines():
        if line.startswith("===== phase:"):
            current = line.split(":", 1)[1].strip()
            continue
        if current == phase:
            lines.append(line)
    return parse_access_log(lines, phase_file=True)


def _absolute(conn: str, path: str) -> str:
    """Kernel and hotplug connections write paths relative to their domain's home."""
    if path.startswith("/"):
        return path
    m = re.match(r"D(\d+)$", conn)
    home = f"/local/domain/{m.group(1)}" if m else "/local/domain/0"
    return f"{home}/{path}"


def units(ops: list[LogOp]) -> list[Unit]:
    """Group mutations into committed transactions and plain ops, in commit order.

    A transaction is placed where it commits; aborted (EAGAIN) attempts are dropped, and an
    oxenstored replay (`r(N):A5`) counts as the transaction it replays.
    """
    pending: dict[tuple[str, int], list[tuple[str, str, str]]] = {}
    out: list[Unit] = []
    for op in ops:
        conn = op.conn.split(":")[-1]
        if op.op in MUTATIONS:
            entry = (op.op, _absolute(conn, op.path), op.value)
            if op.tx:
                pending.setdefault((conn, op.tx), []).append(entry)
            else:
                out.append(Unit(False, (entry,)))
        elif op.op == "commit":
            if op.conn.startswith("r("):  # the replay re-logged the ops under a new tx id
                replayed = pending.pop((conn, op.tx), [])
                if replayed:
                    out.append(Unit(True, tuple(replayed)))
                continue
            body = pending.pop((conn, op.tx), [])
            if body:
                out.append(Unit(True, tuple(body)))
        elif op.op == "conflict":
            pending.pop((conn, op.tx), None)
    return out


def normalize_units(items: list[Unit]) -> list[Unit]:
    """Replace the VARYING_VALUES in written values."""
    out = []
    for unit in items:
        ops = []
        for op, path, value in unit.ops:
            for pattern, placeholder in VARYING_VALUES:
                if op == "write" and pattern.match(path):
                    value = placeholder
            ops.append((op, path, value))
        out.append(Unit(unit.in_transaction, tuple(ops)))
    return out


def state_sequences(items: list[Unit]) -> dict[str, list[tuple[str, bool]]]:
    """Every value written to a .../state node, with whether it was alone in its transaction."""
    seq: dict[str, list[tuple[str, bool]]] = {}
    for unit in items:
        for op, path, value in unit.ops:
            if op == "write" and path.endswith("/state"):
                alone = unit.in_transaction and len(unit.ops) == 1
                seq.setdefault(path, []).append((value, alone))
    return seq


@attrs.define
class AccessLogCursor:
    """Reads the part of an instance's access log written since the last call."""

    xsd: SandboxXenstored
    offset: int = 0

    def take(self) -> list[LogOp]:
        text = self.xsd.access_log_path.read_text()
        new, self.offset = text[self.offset :], len(text)
        return parse_access_log(new.splitlines())
