"""What the engine answers: an `Outcome` (the decision, every check, the parties, the actions)
and how parties and resources are named in it."""

from __future__ import annotations

import attrs

from shyped.core.actions import (
    Action,
    is_veto,
)
from shyped.core.audit import Party
from shyped.core.hostfacts import DecisionKind, Domain, NeedsDecision
from shyped.core.labelstore import (
    LabelStoreError,
    bridge_resource,
    disk_resource,
    pci_resource,
    resource_id,
)
from shyped.core.modes import Mode
from shyped.policy.decisions import Decision


def _uuid_text(uuid: str | None) -> str:
    return f", {uuid}" if uuid else ""


def describe_party(p: Party | None) -> str:
    """``web(3, 6f1b…)``, ``Domain-0(0)``, ``disk:/img/a.img``: for log lines."""
    if p is None:
        return "?"
    if p.resource is not None:
        return p.resource
    return f"{p.name or '?'}({p.domid}{_uuid_text(p.uuid)})"


@attrs.frozen
class Outcome:
    """One decision as the daemon took it.

    `decision` is the check that decided (the first denial, else the last permit); `checks`
    every check made, in order. `subject` is the domain asked about (device: the frontend;
    vchan: the server), `peer` the other domain (device: the backend; vchan: the client that
    decided), `clients` all named vchan clients, `resource` the resource a device uses.
    `planned` are the vetoes enforcing mode carries out; `actions` what the daemon will
    actually do (label writes, and the vetoes when enforcing). `note` says why a planned veto is
    not carried out. `received` is set by the daemon (decision latency for metrics).
    """

    need: NeedsDecision
    what: str
    decision: Decision
    checks: tuple[Decision, ...]
    subject: Party
    mode: Mode
    policy: str
    peer: Party | None = None
    clients: tuple[Party, ...] = ()
    resource: Party | None = None
    label: str | None = None
    actions: tuple[Action, ...] = ()
    planned: tuple[Action, ...] = ()
    note: str = ""
    #: ``time.monotonic()`` when the daemon received the xenstore event (or started the
    #: reconcile) this decision came from; None for re-decisions (reload, mode switch).
    received: float | None = None

    @property
    def kind(self) -> DecisionKind:
        return self.need.kind

    @property
    def allowed(self) -> bool:
        return self.decision.permitted

    @property
    def enforced(self) -> bool:
        """A veto is carried out for this decision."""
        return any(is_veto(a) for a in self.actions)

    def parties(self) -> str:
        if self.kind == "domain":
            text = f"dom={describe_party(self.subject)}"
        elif self.kind == "device":
            text = f"fe={describe_party(self.subject)} be={describe_party(self.peer)}"
        else:
            text = f"server={describe_party(self.subject)} clients=" + (
                ",".join(describe_party(c) for c in self.clients) or "-"
            )
        if self.resource is not None:
            text += f" res={self.resource.resource}"
        return text

    def log_line(self) -> str:
        """``decision: deny device vif 3/0 fe=… be=… [ste] <reason> -> <actions>``."""
        d = self.decision
        line = f"decision: {d.verdict} {self.what} {self.parties()} [{d.rule}] {d.reason}"
        vetoes = [a for a in self.actions if is_veto(a)]
        if vetoes:
            line += " -> " + "; ".join(a.describe() for a in vetoes)
        elif self.planned:
            line += f" ({self.note or 'not enforced'})"
        return line


def _party(dom: Domain | None, domid: int) -> Party:
    if dom is None:
        return Party(domid=domid)
    return Party(name=dom.name, domid=domid, uuid=dom.uuid, label=dom.label)


def resource_of(kind: str, raw: str) -> str | None:
    """The label store's resource id of what a device uses; None if it is not a valid one."""
    try:
        if kind == "vif":
            return bridge_resource(raw)
        if kind == "vbd":
            return disk_resource(raw)
        if kind == "pci":
            return pci_resource(raw)
        return resource_id(raw)
    except LabelStoreError:
        return None
