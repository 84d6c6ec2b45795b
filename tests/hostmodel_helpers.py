"""Helpers for the event-parser and host-model tests: reading the Xen 4.17 reference capture.

`load_layout` reads a ``xenstore-ls -fp`` dump into the snapshot shape the gateway produces
(path -> (value, perms)); `replay_log` walks ``access-log-nonread.txt`` and yields the mutating
operations as the daemon's watch would deliver them: one batch per committed transaction (or
per operation outside a transaction), each node with the value the operation left (None for
``rm``) and, for ``setperms``, the permissions it set.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import attrs

from shyped.core.assembler import EventAssembler
from shyped.core.events import Event
from shyped.core.host import HostModel
from shyped.core.hostfacts import ModelOutput, NeedsDecision

REFERENCE = Path(__file__).parent / "reference"
UUID = "6f1b1c9e-2a4d-4c55-9e0e-5ca1ab1e0001"
VCHAN_PATH = "/local/domain/0/data/vchan-test"

Snapshot = dict[str, tuple[bytes, list[bytes] | None]]
Node = tuple[str, bytes | None, list[bytes] | None]

_LAYOUT = re.compile(r'^(\S+) = "(.*)"   \((.*)\)$')
_OP = re.compile(r"^\[[^\]]*\]\s+(\S+)\s+(w event|t start|t end|\S+) +(.*)$")


def load_layout(*names: str) -> Snapshot:
    """Merge ``xenstore-ls -fp`` dumps (later files win) into path -> (value, perms)."""
    snap: Snapshot = {}
    for name in names:
        for line in (REFERENCE / name).read_text().splitlines():
            m = _LAYOUT.match(line)
            if m:
                perms = [p.encode() for p in m[3].split(",")]
                snap[m[1]] = (m[2].encode(), perms)
    return snap


@attrs.frozen
class Step:
    """Either a phase marker (``phase`` set) or a batch of nodes to feed."""

    phase: str | None = None
    nodes: tuple[Node, ...] = ()


def _absolute(conn: str, path: str) -> str:
    if path.startswith("/") or path.startswith("@"):
        return path
    home = conn[1:] if conn.startswith("D") else "0"  # socket clients in dom0 are relative to 0
    return f"/local/domain/{home}/{path}"


def replay_log(name: str = "access-log-nonread.txt") -> Iterator[Step]:
    """The capture's mutating operations as watch batches, with phase markers in between."""
    values: dict[str, bytes] = {}
    open_tx: dict[str, list[Node]] = {}
    for line in (REFERENCE / name).read_text().splitlines():
        if line.startswith("### PHASE "):
            yield Step(phase=line.split()[2])
            continue
        m = _OP.match(line)
        if m is None:
            continue
        conn_tid, op, data = m[1], m[2], m[3]
        conn, _, tid = conn_tid.partition(".")
        if op == "t end":
            batch = open_tx.pop(conn_tid, [])
            if batch:
                yield Step(nodes=tuple(batch))
            continue
        node: Node | None = None
        if op == "write":
            path, _, value = data.partition(" ")
            path = _absolute(conn, path)
            values[path] = value.encode()
            node = (path, values[path], None)
        elif op == "mkdir":
            path = _absolute(conn, data.strip())
            values.setdefault(path, b"")
            node = (path, values[path], None)
        elif op == "rm":
            path = _absolute(conn, data.strip())
            for p in [p for p in values if p == path or p.startswith(path + "/")]:
                del values[p]
            node = (path, None, None)
        elif op == "setperms":
            path, *perms = data.split()
            path = _absolute(conn, path)
            node = (path, values.get(path, b""), [p.encode() for p in perms])
        elif op == "introduce":
            node = ("@introduceDomain", None, None)
        if node is None:
            continue
        if tid:
            open_tx.setdefault(conn_tid, []).append(node)
        else:
            yield Step(nodes=(node,))


def allow_all(model: HostModel, outputs: list[ModelOutput]) -> list[NeedsDecision]:
    """A trivial engine: allow everything, label domains 'guest' (dom0 keeps its own)."""
    asked: list[NeedsDecision] = []
    queue = [o for o in outputs if isinstance(o, NeedsDecision)]
    while queue:
        need = queue.pop(0)
        asked.append(need)
        queue.extend(model.record_decision(need, True, label="guest", reason="test"))
    return asked


def model_from(events: list[Event], model: HostModel | None = None) -> HostModel:
    """Apply events to a (new) model, allowing every decision."""
    model = model or HostModel(dom0_label="dom0")
    allow_all(model, model.apply_all(events))
    return model


def summary(model: HostModel) -> dict[str, object]:
    """The model's facts (not its counters) in a comparable shape."""
    return {
        "domains": {d.domid: (d.uuid, d.name, d.state, d.label) for d in model.domains()},
        "devices": {
            dev.key: (
                dev.backend,
                dev.backend_kind,
                dev.resource,
                dev.writable,
                dev.frontend_state,
                dev.backend_state,
                dev.online,
                dev.grant_refs,
                dev.event_channels,
                None if dev.decision is None else dev.decision.allowed,
            )
            for dev in model.devices()
        },
        "vchans": {v.key: (v.clients, v.any_domain, v.ring_ref, v.port) for v in model.vchans()},
        "running": model.running_system(),
    }


def from_snapshot(snap: Snapshot) -> tuple[EventAssembler, HostModel, list[Event]]:
    """A fresh assembler and model fed with one snapshot (every decision allowed)."""
    asm = EventAssembler()
    events = asm.reconcile(snap)
    return asm, model_from(events), events
