"""The results of the control operations: what the daemon answers, as frozen attrs.

`shyped.control.backend.ControlBackend` returns these; `shyped.control.protocol` encodes them
as a response's ``result`` (and the client decodes them back). Plain data only (strings, ints,
bools, tuples, nested classes of this module). Labels in results are full
``ACM:<policy>:<label>`` strings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import attrs

from shyped.control.arguments import LabelType, ModeName, PolicyFormat

if TYPE_CHECKING:
    from collections.abc import Iterable

    from shyped.core.quota import QuotaUsage


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
