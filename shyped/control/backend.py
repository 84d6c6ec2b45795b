"""What the control socket needs from the daemon: the `ControlBackend` protocol and its data.

The control server (`shyped.control.server`) knows nothing about the daemon's internals; it
calls one method of a `ControlBackend` per request, with the request's arguments already
validated into one of the frozen attrs classes of `shyped.control.arguments`, and sends back
the attrs result it gets (`shyped.control.results`; both re-exported here). Every such class is
plain data (strings, ints, bools, tuples, nested classes) so that `shyped.control.protocol` can
turn it into JSON and back without surprises.

Writing an adapter (the daemon side):

- A method may return its result directly or a `Deferred` firing with it (use a Deferred for
  anything that waits: `wait_admission`, `policy_load`). Methods are called on the reactor
  thread and must not block it.
- Refuse with `ControlError(ErrorCode.X, "message", details)` from `shyped.control.protocol`;
  the code is what clients match on, the message is for people. Codes an adapter uses:
  ``not-found`` (no such domain/label/resource), ``invalid-argument`` (a label or resource
  that cannot be parsed), ``denied`` (the policy said no: a relabel; put the reasons in
  ``details["reasons"]``), ``policy-invalid`` (a policy text that does not load; problems in
  ``details["problems"]``), ``policy-rejected`` (a valid policy the running system does not
  satisfy; every reason in ``details["problems"]``), ``unavailable`` (not ready yet, e.g.
  before the first reconcile), ``admission-timeout``. Any other exception becomes
  ``internal`` (logged with its traceback; the client sees no details).
- Labels in *results* are full ``ACM:<policy>:<label>`` strings (what `xm getlabel` printed);
  labels in *arguments* may be either that or a bare label name of the active policy.
- Domains in arguments are named by a `DomainRef` string: a domid (decimal), a UUID, or a
  name; `shyped.control.views.match_domain` resolves one over the daemon's domains.
- Pure helpers for the decisions themselves (dry run, label lists, policy parsing) are in
  `shyped.control.views`, built on the same `PolicyEngine` the daemon enforces with.

Authorization is the server's job (it knows the peer); `audit` lets the daemon record every
change request, allowed or refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias, TypeVar

import attrs

from shyped.control.arguments import (
    ChannelItem,
    DiskItem,
    DomainArgs,
    DomainRef,
    DryRunArgs,
    LabelsArgs,
    LabelType,
    ModeName,
    NewDomain,
    NoArgs,
    PciItem,
    PlacementArgs,
    PolicyFormat,
    PolicyLoadArgs,
    PolicyShowArgs,
    PolicySource,
    RegisterDomainArgs,
    RelabelDomainArgs,
    ReserveArgs,
    ResourceArgs,
    SetEnforceArgs,
    SetResourceLabelArgs,
    ValidateLabelArgs,
    VifItem,
    WaitAdmissionArgs,
)
from shyped.control.results import (
    Admission,
    Counts,
    DeviceVerdict,
    DomainInfo,
    DomainList,
    DryRunResult,
    EnforceMode,
    FlaskInfo,
    Forgotten,
    LabelInfo,
    LabelList,
    LabelStoreStatus,
    PendingVeto,
    PlacementHost,
    PlacementResult,
    PolicyCheckResult,
    PolicyInfo,
    PolicyLoadResult,
    PolicyText,
    Pong,
    PoolStatus,
    QuotaRow,
    Registration,
    ReserveResult,
    ResourceInfo,
    ResourceLabelChange,
    ResourceList,
    Status,
    Verdict,
    quota_rows,
)

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from shyped.control.attestops import AttestAk, AttestQuote, AttestQuoteArgs

_T = TypeVar("_T")

#: A result, or a Deferred firing with it.
MaybeDeferred: TypeAlias = "_T | Deferred[_T]"

Access = Literal["read", "admin"]


# --------------------------------------------------------------------------- audit


@attrs.frozen
class Peer:
    """Who is on the other end of a control connection (SO_PEERCRED, SO_PEERGROUPS)."""

    uid: int
    gid: int
    pid: int
    groups: tuple[int, ...] = ()


@attrs.frozen
class ControlAudit:
    """A change request seen by the server, allowed or refused (for the audit log)."""

    peer: Peer
    op: str
    allowed: bool
    #: The error code when refused or failed; None when it succeeded.
    code: str | None
    summary: str
    #: None for one request; for a summary of refusals (``op`` then names their kinds), how
    #: many were refused in the interval beyond the one recorded in full.
    count: int | None = None


# --------------------------------------------------------------------------- the protocol


class ControlBackend(Protocol):
    """Every operation the control server asks of the daemon (one method per request op)."""

    def status(self) -> MaybeDeferred[Status]:
        """Mode, active policy (name, version, sha256) and counts."""

    def getenforce(self) -> MaybeDeferred[EnforceMode]: ...

    def setenforce(self, args: SetEnforceArgs) -> MaybeDeferred[EnforceMode]:
        """Switch enforcing/permissive; `previous` is the mode before."""

    def labels(self, args: LabelsArgs) -> MaybeDeferred[LabelList]:
        """The active policy's labels (`views.label_list`)."""

    def validate_label(self, args: ValidateLabelArgs) -> MaybeDeferred[LabelInfo]:
        """The label if the active policy has it, else ``not-found``/``invalid-argument``."""

    def list_domains(self) -> MaybeDeferred[DomainList]:
        """Every domain the daemon knows, with its label and state (``xl list -Z``)."""

    def get_domain_label(self, args: DomainArgs) -> MaybeDeferred[DomainInfo]: ...

    def get_resource_label(self, args: ResourceArgs) -> MaybeDeferred[ResourceInfo]:
        """The resource's stored label (`label` None when it has none)."""

    def resources(self) -> MaybeDeferred[ResourceList]:
        """Every labelled resource of the label store."""

    def dry_run(self, args: DryRunArgs) -> MaybeDeferred[DryRunResult]:
        """Would the domain (CW admission) and each device (STE, resource) be admitted now?"""

    def register_domain(self, args: RegisterDomainArgs) -> MaybeDeferred[Registration]:
        """Store (persistently) the label of a domain about to be created, keyed by UUID."""

    def wait_admission(self, args: WaitAdmissionArgs) -> MaybeDeferred[Admission]:
        """Fire once the domain and its devices are decided; ``admission-timeout`` otherwise."""

    def relabel_domain(self, args: RelabelDomainArgs) -> MaybeDeferred[DomainInfo]:
        """Relabel a running domain after re-checking the Chinese Wall and its live channels
        and resources under the new label (as ACM did); ``denied`` with every reason."""

    def set_resource_label(self, args: SetResourceLabelArgs) -> MaybeDeferred[ResourceLabelChange]:
        """Label (or unlabel) a resource in the label store, written atomically."""

    def policy_show(self, args: PolicyShowArgs) -> MaybeDeferred[PolicyText]: ...

    def policy_check(self, args: PolicySource) -> MaybeDeferred[PolicyCheckResult]:
        """Parse the text and run the update check against the running system; change nothing."""

    def policy_load(self, args: PolicyLoadArgs) -> MaybeDeferred[PolicyLoadResult]:
        """Check and activate a policy (persisting it where the daemon reads it at start)."""

    def policy_reset(self) -> MaybeDeferred[PolicyLoadResult]:
        """Return to Xen ACM's DEFAULT policy (``xm resetpolicy``) through the update check:
        refused while a domain runs with a label it lacks; resource labels become
        ``INV_ACM:<old policy>:<label>``."""

    def forget_domain(self, args: DomainArgs) -> MaybeDeferred[Forgotten]:
        """Forget the stored label of a domain that does not run (``xm rmlabel mgt``), by
        name or UUID; ``denied`` while a domain by that name or UUID runs."""

    def placement(self, args: PlacementArgs) -> PlacementResult:
        """Pool mode: the live hosts where a label would be admitted now, with reasons."""

    def reserve(self, args: ReserveArgs) -> MaybeDeferred[ReserveResult]:
        """Pool mode: a reservation the destination's daemon grants or refuses."""

    def attest_quote(self, args: AttestQuoteArgs) -> MaybeDeferred[AttestQuote]:
        """A TPM quote bundle (docs/attestation.md)."""

    def attest_ak(self) -> AttestAk:
        """The attestation key's public part."""

    def audit(self, event: ControlAudit) -> None:
        """Record a change request (allowed or refused). Must not raise or block."""


__all__ = [
    "Access",
    "Admission",
    "ChannelItem",
    "ControlAudit",
    "ControlBackend",
    "Counts",
    "DeviceVerdict",
    "DiskItem",
    "DomainArgs",
    "DomainInfo",
    "DomainList",
    "DomainRef",
    "DryRunArgs",
    "DryRunResult",
    "EnforceMode",
    "FlaskInfo",
    "Forgotten",
    "LabelInfo",
    "LabelList",
    "LabelStoreStatus",
    "LabelType",
    "LabelsArgs",
    "MaybeDeferred",
    "ModeName",
    "NewDomain",
    "NoArgs",
    "PciItem",
    "Peer",
    "PendingVeto",
    "PlacementArgs",
    "PlacementHost",
    "PlacementResult",
    "PolicyCheckResult",
    "PolicyFormat",
    "PolicyInfo",
    "PolicyLoadArgs",
    "PolicyLoadResult",
    "PolicyShowArgs",
    "PolicySource",
    "PolicyText",
    "Pong",
    "PoolStatus",
    "QuotaRow",
    "RegisterDomainArgs",
    "Registration",
    "RelabelDomainArgs",
    "ReserveArgs",
    "ReserveResult",
    "ResourceArgs",
    "ResourceInfo",
    "ResourceLabelChange",
    "ResourceList",
    "SetEnforceArgs",
    "SetResourceLabelArgs",
    "Status",
    "ValidateLabelArgs",
    "Verdict",
    "VifItem",
    "WaitAdmissionArgs",
    "quota_rows",
]
