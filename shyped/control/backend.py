"""What the control socket needs from the daemon: the `ControlBackend` protocol and its data.

The control server (`shyped.control.server`) knows nothing about the daemon's internals; it
calls one method of a `ControlBackend` per request, with the request's arguments already
validated into one of the frozen attrs classes below, and sends back the attrs result it gets.
Every class here is plain data (strings, ints, bools, tuples, nested classes of this module) so
that `shyped.control.protocol` can turn it into JSON and back without surprises.

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

if TYPE_CHECKING:
    from collections.abc import Iterable

    from twisted.internet.defer import Deferred

    from shyped.control.attestops import AttestAk, AttestQuote, AttestQuoteArgs
    from shyped.core.quota import QuotaUsage

_T = TypeVar("_T")

#: A result, or a Deferred firing with it.
MaybeDeferred: TypeAlias = "_T | Deferred[_T]"

#: A domain as an operator names it: domid (decimal), UUID or name.
DomainRef: TypeAlias = str
ModeName = Literal["enforcing", "permissive"]
LabelType = Literal["vm", "res"]
PolicyFormat = Literal["toml", "acm-xml"]
Access = Literal["read", "admin"]


# --------------------------------------------------------------------------- arguments


@attrs.frozen
class NoArgs:
    """Arguments of a request that takes none."""


@attrs.frozen
class LabelsArgs:
    type: Literal["vm", "res", "any"] = "any"


@attrs.frozen
class DomainArgs:
    domain: DomainRef


@attrs.frozen
class ResourceArgs:
    #: ``file:/path``, ``phy:/dev/…``, an absolute path, or ``bridge:NAME``.
    resource: str


@attrs.frozen
class ValidateLabelArgs:
    label: str
    type: LabelType = "vm"


@attrs.frozen
class NewDomain:
    """A domain about to be created, as its xl.cfg describes it."""

    name: str
    uuid: str | None = None
    #: The cfg's label (``seclabel``/``access_control``); None: unlabelled in the cfg.
    label: str | None = None


@attrs.frozen
class DiskItem:
    """One disk of a cfg or a block-attach (xl-disk-configuration(5), already parsed)."""

    target: str
    vdev: str
    writable: bool = True
    backend_domid: int = 0
    cdrom: bool = False


@attrs.frozen
class VifItem:
    """One vif of a cfg or a network-attach; `bridge` defaults to libxl's ``xenbr0``."""

    bridge: str = "xenbr0"
    backend_domid: int = 0
    mac: str | None = None
    devid: int | None = None


@attrs.frozen
class PciItem:
    """One PCI device of a cfg's ``pci`` list or a pci-attach: ``SSSS:BB:DD.F``."""

    bdf: str


@attrs.frozen
class ChannelItem:
    """A device of another `kind` (vtpm, vkbd, a console channel; vusb and the like are
    denied): STE between the domain and its `backend` (name, domid or UUID)."""

    kind: str
    backend: DomainRef = "0"


@attrs.frozen
class DryRunArgs:
    """Would these be admitted now? Either a new `domain` or devices for a `running` one."""

    domain: NewDomain | None = None
    running: DomainRef | None = None
    disks: tuple[DiskItem, ...] = ()
    vifs: tuple[VifItem, ...] = ()
    pcis: tuple[PciItem, ...] = ()
    channels: tuple[ChannelItem, ...] = ()
    #: Xen ACM's ``xm dry-run`` view: the label exists and each disk's resource label shares
    #: a type with it; no Chinese Wall against running domains, no device channels, no vifs.
    acm_only: bool = False

    def __attrs_post_init__(self) -> None:
        if (self.domain is None) == (self.running is None):
            raise ValueError("exactly one of 'domain' and 'running' is required")


@attrs.frozen
class RegisterDomainArgs:
    """Assign `label` to the domain with this UUID before it is created (None: forget it)."""

    uuid: str
    name: str | None = None
    label: str | None = None


@attrs.frozen
class WaitAdmissionArgs:
    """Wait until the domain with this UUID and at least `devices` devices are decided."""

    uuid: str
    devices: int = attrs.field(default=0, validator=attrs.validators.in_(range(0, 4097)))
    timeout: float = attrs.field(default=30.0)

    @timeout.validator
    def _timeout(self, _a: attrs.Attribute[float], value: float) -> None:
        if not 0 < value <= 600:
            raise ValueError("timeout must be in (0, 600] seconds")


@attrs.frozen
class RelabelDomainArgs:
    domain: DomainRef
    label: str


@attrs.frozen
class SetResourceLabelArgs:
    resource: str
    #: None removes the resource's label.
    label: str | None


@attrs.frozen
class PolicyShowArgs:
    format: PolicyFormat = "toml"


@attrs.frozen
class PolicySource:
    """A policy text sent by the client (the daemon may not see the client's files)."""

    text: str
    filename: str = "<policy>"
    format: Literal["auto", "toml", "acm-xml"] = "auto"


@attrs.frozen
class PolicyLoadArgs:
    """Load `source`, or re-read the configured policy file when it is None (like SIGHUP)."""

    source: PolicySource | None = None


@attrs.frozen
class SetEnforceArgs:
    mode: ModeName


# --------------------------------------------------------------------------- results


@attrs.frozen
class Pong:
    protocol: int
    daemon: str


@attrs.frozen
class PolicyInfo:
    name: str
    version: str
    #: sha256 of the policy file's bytes as loaded (hex).
    sha256: str
    format: PolicyFormat
    source: str | None = None


@attrs.frozen
class Counts:
    domains: int = 0
    admitted: int = 0
    denied: int = 0
    paused: int = 0
    undecided: int = 0
    devices: int = 0
    vchans: int = 0
    vm_labels: int = 0
    resource_labels: int = 0
    labelled_resources: int = 0


@attrs.frozen
class QuotaRow:
    """One row of the quota usage table (`shyped.core.quota.QuotaUsage`): `used` in the quota's
    unit (MiB for memory), `domid` the domain with the highest use (None for max_domains)."""

    label: str
    quota: str
    used: int
    limit: int | None = None
    domid: int | None = None
    exceeded: bool = False


def quota_rows(table: Iterable[QuotaUsage]) -> tuple[QuotaRow, ...]:
    """`shyped.core.quota.quota_table` rows as the protocol carries them."""
    return tuple(
        QuotaRow(r.label, r.kind.value, r.used, r.limit, r.domid, r.exceeded) for r in table
    )


@attrs.frozen
class LabelStoreStatus:
    """The label store the daemon uses: its file, the reloads (SIGHUP, ``policy load``) that
    found it unusable and kept the one in use, and why the last one did (None: it loaded)."""

    path: str
    reload_failures: int = 0
    error: str | None = None


@attrs.frozen
class PendingVeto:
    """A domain veto the toolstack failed to carry out, retried with backoff until done or
    the domain is gone (docs/operations.md, "Pending vetoes")."""

    domid: int
    veto: str  # "destroy" or "pause"
    failures: int
    error: str
    #: Seconds since the first failure, and until the next attempt.
    failing_for: float
    next_attempt_in: float
    name: str | None = None


@attrs.frozen
class FlaskInfo:
    """Xen's FLASK as the daemon detected it at start."""

    #: enforcing, permissive, or absent (Debian's Xen has no XSM; the sandbox no Xen)
    mode: str
    #: why it is absent
    reason: str | None = None
    #: the binary FLASK policy shyped compiled and loaded into Xen
    policy_sha256: str | None = None
    #: AVC denials read from Xen's console ring; domains relabelled in Xen
    denials: int = 0
    relabels: int = 0


@attrs.frozen
class PlacementArgs:
    """Where may a domain with VM label `label` be admitted now (pool mode)?"""

    label: str


@attrs.frozen
class PlacementHost:
    host: str
    admitted: bool
    reason: str


@attrs.frozen
class PlacementResult:
    label: str
    #: the pool store's revision the answer was computed at, and its state
    revision: int
    state: str
    hosts: tuple[PlacementHost, ...]


@attrs.frozen
class ReserveArgs:
    """Pool mode: ask host `host`'s daemon for a place for the domain with `uuid` (label: the
    given one, else the pool store's, else the running domain's) before a migration/restore."""

    uuid: str
    host: str
    kind: Literal["migrate", "restore"] = "migrate"
    label: str | None = None


@attrs.frozen
class ReserveResult:
    id: str
    host: str
    granted: bool
    reason: str
    label: str


@attrs.frozen
class PoolStatus:
    state: str
    host: str
    prefix: str
    revision: int
    entries: int
    refused_entries: int
    error: str | None
    since: float
    #: label changes made on this host and not written to etcd yet (retried)
    unpublished: int = 0


@attrs.frozen
class Status:
    mode: ModeName
    policy: PolicyInfo
    counts: Counts
    #: False until the first reconcile is done.
    ready: bool = True
    daemon: str = ""
    #: Labels with quotas: limit and use per quota.
    quotas: tuple[QuotaRow, ...] = ()
    #: The audit trail: "ok", "unavailable" (fail-closed: new domains denied), "degraded"
    #: (records dropped), None without one.
    audit: str | None = None
    #: Domain vetoes that failed and are being retried.
    vetoes_pending: tuple[PendingVeto, ...] = ()
    #: Xen's FLASK (hypervisor enforcement, docs/flask.md); None from a daemon without it.
    flask: FlaskInfo | None = None
    #: Pool mode (docs/pool.md): state ("connected", "cached": etcd unreachable, enforcing
    #: the last known state), host, prefix, revision, entries; None on a single host.
    pool: PoolStatus | None = None
    #: The label store: reloads that found it unusable (kept the one in use), and why.
    label_store: LabelStoreStatus | None = None


@attrs.frozen
class EnforceMode:
    mode: ModeName
    previous: ModeName | None = None


@attrs.frozen
class LabelInfo:
    name: str
    #: ``ACM:<policy>:<name>``
    label: str
    type: LabelType
    ste_types: tuple[str, ...] = ()
    cw_types: tuple[str, ...] = ()
    mls: str | None = None
    bootstrap: bool = False
    #: Dynamic labels (docs/policy.md): a VM label that is a template and the types its
    #: instances share; a resource label that belongs to one instance.
    dynamic: bool = False
    shared_types: tuple[str, ...] = ()
    per_instance: bool = False


@attrs.frozen
class LabelList:
    policy: str
    labels: tuple[LabelInfo, ...]


@attrs.frozen
class DomainInfo:
    domid: int
    name: str | None
    uuid: str | None
    label: str | None
    #: The daemon's view: seen (undecided), admitted, denied, paused, gone.
    state: str
    reason: str | None = None
    #: ``xl list``'s columns, as far as the daemon knows them (None: unknown): memory target
    #: in MiB and vCPUs online (dom0-written xenstore nodes), CPU seconds (from ``xl list``,
    #: only on a real host with the metrics' CPU poll on).
    memory_mib: int | None = None
    vcpus: int | None = None
    cpu_seconds: float | None = None
    #: Its security context in Xen (``xl list -Z``) when Xen has FLASK, as last read.
    flask_context: str | None = None
    #: The instance it runs as under a dynamic label (``web#3f…``; docs/policy.md).
    instance: str | None = None


@attrs.frozen
class DomainList:
    domains: tuple[DomainInfo, ...]


@attrs.frozen
class ResourceInfo:
    #: Normalised id: ``disk:/abs/path`` or ``bridge:NAME``.
    resource: str
    label: str | None


@attrs.frozen
class ResourceList:
    resources: tuple[ResourceInfo, ...]


@attrs.frozen
class Verdict:
    """One item of a dry run or an admission: PERMITTED or DENIED, and why."""

    item: str
    kind: Literal["domain", "disk", "vif", "pci", "device"]
    permitted: bool
    reason: str
    rule: str | None = None


@attrs.frozen
class DryRunResult:
    permitted: bool
    items: tuple[Verdict, ...]


@attrs.frozen
class Registration:
    uuid: str
    name: str | None
    label: str | None


@attrs.frozen
class Forgotten:
    """A domain label the store no longer holds (``forget_domain``)."""

    domain: str
    #: the label that was stored by UUID, by name (full ``ACM:`` strings; None: none was)
    by_uuid: str | None
    by_name: str | None


@attrs.frozen
class DeviceVerdict:
    kind: str
    devid: int
    backend_domid: int
    permitted: bool
    reason: str
    resource: str | None = None


@attrs.frozen
class Admission:
    """What the daemon decided for a new domain and its devices."""

    domid: int
    name: str | None
    uuid: str
    admitted: bool
    state: str
    reason: str
    devices: tuple[DeviceVerdict, ...] = ()
    #: The instance it runs as under a dynamic label (docs/policy.md), else None.
    instance: str | None = None

    @property
    def permitted(self) -> bool:
        """The domain and every device were admitted."""
        return self.admitted and all(d.permitted for d in self.devices)


@attrs.frozen
class ResourceLabelChange:
    resource: str
    label: str | None
    previous: str | None


@attrs.frozen
class PolicyText:
    policy: PolicyInfo
    format: PolicyFormat
    text: str


@attrs.frozen
class PolicyCheckResult:
    """Would the policy replace the active one now? Every reason it would not."""

    allowed: bool
    policy: PolicyInfo
    problems: tuple[str, ...] = ()


@attrs.frozen
class PolicyLoadResult:
    policy: PolicyInfo
    previous: PolicyInfo | None


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
