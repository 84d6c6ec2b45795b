"""Per-label quotas (pure): checks returning policy `Decision`s with rule ``quota``, and the
quota usage table ``shypectl status`` shows.

A VM label's `Quota` (``shyped.policy.model``) limits how many running domains carry the label
(``max_domains``) and, per domain, its memory (MiB), vCPUs, devices, vchans, event channel
ports and grant references. Exceeding any is a veto like any other: a denying `Decision` whose
reason names the label, the quota and the numbers::

    deny domain-admit [quota]: label 'web' quota max_memory_mib: domain 'web1' (3) may use
    256 MiB, limit 128 MiB

What is compared (see `shyped.core.accounting`):

* ``max_domains``: running (admitted or paused) domains with the label, counting the one being
  checked;
* ``max_memory_mib``: the domain's ``memory/static-max`` (the ceiling it may balloon up to),
  else its ``memory/target``, rounded up to MiB;
* ``max_vcpus``: the vCPUs the domain was built with (``cpu/<n>`` entries: ``max_vcpus``), not
  only the online ones, since ``xl vcpu-set`` can bring them online without a new decision;
* ``max_devices``: devices the domain is the frontend of (the dom0-only libxl records);
* ``max_vchans``: rendezvous the domain serves or joins as a named client;
* ``max_event_channels`` / ``max_grant_refs``: ports and grant references the domain has
  published in xenstore (its frontends, its vchans). These are the guest's own writes: a count
  of what it advertised, not of what the hypervisor granted (only XSM sees that).

Sizes that are not known yet (libxl writes ``memory/*`` and ``cpu/*`` after the creation
transaction) are not checked; the engine re-checks a domain when its account changes
(`shyped.core.accounting.touched_domains`). Which quotas a check looks at depends on the hook:
`KINDS_BY_HOOK`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any, Final

import attrs

from shyped.core.accounting import RUNNING_STATES, DomainAccount, HostAccount
from shyped.core.host import HostModel
from shyped.core.metering import CpuWindow, LabelUse, MeterSample, label_use, match
from shyped.policy.decisions import Decision, Hook, Rule
from shyped.policy.model import QUOTA_FIELDS, Policy, Quota

MIB: Final = 1024 * 1024


class QuotaKind(enum.StrEnum):
    """A quota; the value is the `Quota` field (and the policy key) it comes from."""

    DOMAINS = "max_domains"
    MEMORY = "max_memory_mib"
    VCPUS = "max_vcpus"
    DEVICES = "max_devices"
    VCHANS = "max_vchans"
    EVENT_CHANNELS = "max_event_channels"
    GRANT_REFS = "max_grant_refs"
    LABEL_MEMORY = "max_label_memory_mib"
    CPU = "max_cpu_percent"

    @property
    def metric(self) -> str:
        """The ``quota`` label value in metrics (base units: memory in bytes)."""
        return _METRIC[self]

    @property
    def unit(self) -> str:
        """How reasons and the table print an amount of this quota."""
        return _UNIT[self]


_METRIC: Final = {
    QuotaKind.DOMAINS: "domains",
    QuotaKind.MEMORY: "memory_bytes",
    QuotaKind.VCPUS: "vcpus",
    QuotaKind.DEVICES: "devices",
    QuotaKind.VCHANS: "vchans",
    QuotaKind.EVENT_CHANNELS: "event_channels",
    QuotaKind.GRANT_REFS: "grant_refs",
    QuotaKind.LABEL_MEMORY: "label_memory_bytes",
    QuotaKind.CPU: "cpu_ratio",
}
_UNIT: Final = {
    QuotaKind.DOMAINS: "domains",
    QuotaKind.MEMORY: "MiB",
    QuotaKind.VCPUS: "vCPUs",
    QuotaKind.DEVICES: "devices",
    QuotaKind.VCHANS: "vchans",
    QuotaKind.EVENT_CHANNELS: "event channels",
    QuotaKind.GRANT_REFS: "grant refs",
    QuotaKind.LABEL_MEMORY: "MiB",
    QuotaKind.CPU: "% CPU",
}
assert tuple(k.value for k in QuotaKind) == QUOTA_FIELDS

#: Quotas judged on what the hypervisor measures while domains run (`RuntimeQuotas`), never at
#: a hook: memory the label's running domains hold, their CPU over a window.
RUNTIME_KINDS: Final = (QuotaKind.LABEL_MEMORY, QuotaKind.CPU)
#: Quotas judged at admission and at the device and vchan hooks.
ADMISSION_KINDS: Final = tuple(k for k in QuotaKind if k not in RUNTIME_KINDS)

#: Quotas a check looks at, per hook (a device or vchan never fails on memory).
KINDS_BY_HOOK: Final[Mapping[Hook, tuple[QuotaKind, ...]]] = {
    Hook.DOMAIN_ADMIT: ADMISSION_KINDS,
    Hook.DEVICE_CHANNEL: (QuotaKind.DEVICES, QuotaKind.EVENT_CHANNELS, QuotaKind.GRANT_REFS),
    Hook.EVTCHN: (QuotaKind.EVENT_CHANNELS,),
    Hook.GRANT: (QuotaKind.GRANT_REFS,),
    Hook.VCHAN: (QuotaKind.VCHANS, QuotaKind.EVENT_CHANNELS, QuotaKind.GRANT_REFS),
}
#: Per-domain quotas (the admission ones but max_domains), for hooks not listed above.
PER_DOMAIN: Final = tuple(k for k in ADMISSION_KINDS if k is not QuotaKind.DOMAINS)


def _ceil_mib(n: int) -> int:
    return -(-n // MIB)


def domain_use(account: DomainAccount, kind: QuotaKind) -> int | None:
    """What `account` uses of a per-domain quota, in the quota's unit (None: not known)."""
    if kind is QuotaKind.MEMORY:
        mem = account.memory_bytes
        return None if mem is None else _ceil_mib(mem)
    if kind is QuotaKind.VCPUS:
        return account.vcpus
    if kind is QuotaKind.DEVICES:
        return account.device_count
    if kind is QuotaKind.VCHANS:
        return account.vchan_count
    if kind is QuotaKind.EVENT_CHANNELS:
        return account.event_channel_count
    if kind is QuotaKind.GRANT_REFS:
        return account.grant_ref_count
    raise ValueError(f"{kind} is not a per-domain quota")


def limit_of(quota: Quota, kind: QuotaKind) -> int | None:
    value: int | None = getattr(quota, kind.value)
    return value


class CountedLabels(MutableMapping[int, str]):
    """Domain id -> VM label name of the domains counted as running, with the domain ids per
    label kept beside it, so that ``max_domains`` needs no scan of every running domain."""

    def __init__(self, items: Mapping[int, str] | None = None) -> None:
        self._label: dict[int, str] = {}
        self._by_label: dict[str, set[int]] = {}
        for d, label in (items or {}).items():
            self[d] = label

    def __getitem__(self, domid: int) -> str:
        return self._label[domid]

    def __setitem__(self, domid: int, label: str) -> None:
        if domid in self._label:
            del self[domid]
        self._label[domid] = label
        self._by_label.setdefault(label, set()).add(domid)

    def __delitem__(self, domid: int) -> None:
        label = self._label.pop(domid)
        ids = self._by_label[label]
        ids.discard(domid)
        if not ids:
            del self._by_label[label]

    def __iter__(self) -> Iterator[int]:
        return iter(self._label)

    def __len__(self) -> int:
        return len(self._label)

    def with_label(self, label: str) -> frozenset[int] | set[int]:
        """The domain ids counted with `label` (do not change the set returned)."""
        return self._by_label.get(label, frozenset())


def running_with_label(model: HostModel, label: str, *, exclude: int | None = None) -> int:
    """Running (admitted or paused) domains with `label`, leaving out domid `exclude`."""
    return sum(
        1
        for dom in model.domains()
        if dom.label == label and dom.state in RUNNING_STATES and dom.domid != exclude
    )


def _who(account: DomainAccount) -> str:
    if account.name:
        return f"domain {account.name!r} ({account.domid})"
    return f"domain {account.domid}"


def check(
    policy: Policy,
    label: str | None,
    account: DomainAccount,
    *,
    hook: Hook,
    others_running: int | None = None,
    kinds: Iterable[QuotaKind] | None = None,
) -> Decision:
    """Does the domain of `account`, running with VM label `label`, stay within its quotas?

    `label` is the label name the domain runs (or would run) with; `others_running` the running
    domains with that label besides this one (needed for ``max_domains``; None skips it).
    `kinds` defaults to `KINDS_BY_HOOK` for `hook`. A permit for a label without quotas, an
    unknown label or no label (those are for the other rules to judge).
    """
    if label is None:
        return Decision(True, hook, Rule.QUOTA, "unlabelled: no quota applies")
    vm = policy.vm_label(label)
    if vm is None:
        return Decision(True, hook, Rule.QUOTA, f"no quota: {label!r} is not a VM label", label)
    quota = vm.quota
    if quota.is_unlimited:
        return Decision(True, hook, Rule.QUOTA, f"label {label!r} has no quota", label)
    wanted = tuple(kinds) if kinds is not None else KINDS_BY_HOOK.get(hook, PER_DOMAIN)
    over: list[str] = []
    within: list[str] = []
    for kind in QuotaKind:
        if kind not in wanted:
            continue
        limit = limit_of(quota, kind)
        if limit is None:
            continue
        if kind is QuotaKind.DOMAINS:
            if others_running is None:
                continue
            used = others_running + 1
            if used > limit:
                over.append(
                    f"label {label!r} quota {kind}: {used} domains would run with it "
                    f"({_who(account)} and {others_running} more), limit {limit}"
                )
            else:
                within.append(f"{kind.metric} {used}/{limit}")
            continue
        use = domain_use(account, kind)
        if use is None:
            within.append(f"{kind.metric} unknown/{limit}")
            continue
        if use > limit:
            verb = "may use" if kind in (QuotaKind.MEMORY, QuotaKind.VCPUS) else "has"
            over.append(
                f"label {label!r} quota {kind}: {_who(account)} {verb} {use} {kind.unit}, "
                f"limit {limit} {kind.unit}"
            )
        else:
            within.append(f"{kind.metric} {use}/{limit}")
    if over:
        return Decision(False, hook, Rule.QUOTA, "; ".join(over), label)
    if not within:
        return Decision(True, hook, Rule.QUOTA, f"label {label!r}: no quota at this hook", label)
    return Decision(
        True, hook, Rule.QUOTA, f"label {label!r} within quota ({', '.join(within)})", label
    )


# ---- the usage table ------------------------------------------------------------------------


@attrs.frozen
class QuotaUsage:
    """One row of the usage table: a label's quota, its limit and the highest use.

    `used` is in the quota's unit (MiB for memory): the number of running domains for
    ``max_domains``, else the highest use among the label's running domains (`domid` is that
    domain; None when none runs or none has a known value).
    """

    label: str
    kind: QuotaKind
    limit: int | None
    used: int
    domid: int | None = None

    @property
    def exceeded(self) -> bool:
        return self.limit is not None and self.used > self.limit

    @property
    def metric_used(self) -> float:
        """`used` in base units (bytes for memory, CPU seconds per second for CPU)."""
        return _base(self.kind, self.used)

    @property
    def metric_limit(self) -> float | None:
        return None if self.limit is None else _base(self.kind, self.limit)


def _base(kind: QuotaKind, amount: int) -> float:
    if kind in (QuotaKind.MEMORY, QuotaKind.LABEL_MEMORY):
        return amount * MIB
    if kind is QuotaKind.CPU:
        return amount / 100
    return amount


def quota_table(
    policy: Policy,
    host: HostAccount,
    *,
    include_unlimited: bool = False,
    runtime: Mapping[str, LabelUse] | None = None,
) -> tuple[QuotaUsage, ...]:
    """Label → limit/used per quota kind, for VM labels that have a quota (or every label with
    `include_unlimited`), in the policy's label order and `QuotaKind` order. The run-time
    quotas have rows only with `runtime` (the hypervisor's metering: `RuntimeQuotas.last_use`)."""
    wanted = {
        vm.name: vm for vm in policy.vm_labels if include_unlimited or not vm.quota.is_unlimited
    }
    running: dict[str, int] = dict.fromkeys(wanted, 0)
    # label -> per-domain quota (PER_DOMAIN order) -> (highest use, its domid)
    best: dict[str, list[tuple[int, int] | None]] = {n: [None] * len(PER_DOMAIN) for n in wanted}
    for acc in host.domains:
        label = acc.label
        if label is None or label not in wanted or not acc.running:
            continue
        running[label] += 1
        top = best[label]
        for i, kind in enumerate(PER_DOMAIN):
            use = domain_use(acc, kind)
            if use is not None:
                cur = top[i]
                if cur is None or use > cur[0]:
                    top[i] = (use, acc.domid)
    rows: list[QuotaUsage] = []
    for name, vm in wanted.items():
        rows.append(QuotaUsage(name, QuotaKind.DOMAINS, vm.quota.max_domains, running[name]))
        for kind, top_use in zip(PER_DOMAIN, best[name], strict=True):
            limit = limit_of(vm.quota, kind)
            if top_use is None:
                rows.append(QuotaUsage(name, kind, limit, 0))
            else:
                rows.append(QuotaUsage(name, kind, limit, top_use[0], top_use[1]))
        if runtime is not None:
            measured = runtime.get(name)
            for rkind in RUNTIME_KINDS:
                amount, heaviest = _runtime_use(measured, rkind)
                rows.append(
                    QuotaUsage(name, rkind, limit_of(vm.quota, rkind), amount or 0, heaviest)
                )
    return tuple(rows)


def quota_table_dict(rows: Iterable[QuotaUsage]) -> dict[str, dict[str, dict[str, Any]]]:
    """The table as JSON-ready data: label → quota → {limit, used, domid, exceeded}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r.label, {})[r.kind.value] = {
            "limit": r.limit,
            "used": r.used,
            "domid": r.domid,
            "exceeded": r.exceeded,
        }
    return out


def format_quota_table(rows: Iterable[QuotaUsage]) -> str:
    """A fixed-width text table (``-``: unlimited, ``!``: exceeded) for ``shypectl status``."""
    header = ("LABEL", "QUOTA", "USED", "LIMIT", "DOMID", "")
    lines = [header]
    for r in rows:
        lines.append(
            (
                r.label,
                r.kind.value,
                str(r.used),
                "-" if r.limit is None else str(r.limit),
                "-" if r.domid is None else str(r.domid),
                "!" if r.exceeded else "",
            )
        )
    if len(lines) == 1:
        return "no quotas\n"
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() + "\n"
        for line in lines
    )


# ---- run-time quotas ------------------------------------------------------------------------


def _runtime_use(use: LabelUse | None, kind: QuotaKind) -> tuple[int | None, int | None]:
    """A label's use of a run-time quota in the quota's unit (MiB rounded up; whole percent of
    one CPU) and the domain using most of it; (None, None): not measured (yet)."""
    if use is None:
        return None, None
    if kind is QuotaKind.LABEL_MEMORY:
        return _ceil_mib(use.memory_bytes), use.top_memory
    if use.cpu_share is None:
        return None, None
    return round(use.cpu_share * 100), use.top_cpu


@attrs.frozen
class RuntimeBreach:
    """A label over a run-time quota: the denying `decision` (rule quota) and the domain it
    acts on (the label's top consumer of that resource)."""

    label: str
    kind: QuotaKind
    domid: int
    decision: Decision


class RuntimeQuotas:
    """The run-time quotas (pure; the daemon feeds it each metering sample, on the reactor).

    `evaluate` returns a breach when a label's use goes over a limit, once: the same label and
    quota breach again only after the use was back within the limit (a paused domain's CPU
    share falls to zero, so a label whose top consumer was paused and then resumed by the
    operator and still burns CPU breaches again). The CPU share is only judged once the window
    holds `window` seconds of samples.
    """

    def __init__(self, window: float = 60.0) -> None:
        self.window = CpuWindow(window)
        self.last_use: dict[str, LabelUse] | None = None
        self._over: set[tuple[str, QuotaKind]] = set()

    def evaluate(
        self, policy: Policy, sample: MeterSample, host: HostAccount
    ) -> list[RuntimeBreach]:
        self.window.add(sample)
        full = self.window.span >= self.window.window
        uses = label_use(match(sample, host), host, self.window.shares() if full else None)
        self.last_use = uses
        out: list[RuntimeBreach] = []
        for vm in policy.vm_labels:
            for kind in RUNTIME_KINDS:
                limit = limit_of(vm.quota, kind)
                key = (vm.name, kind)
                amount, top = _runtime_use(uses.get(vm.name), kind)
                if limit is None or amount is None or top is None or amount <= limit:
                    self._over.discard(key)
                    continue
                if key in self._over:
                    continue
                self._over.add(key)
                out.append(
                    RuntimeBreach(
                        vm.name,
                        kind,
                        top,
                        _breach(vm.name, kind, amount, limit, top, host, self.window.span),
                    )
                )
        return out


def _breach(
    label: str, kind: QuotaKind, amount: int, limit: int, top: int, host: HostAccount, span: float
) -> Decision:
    acc = host.domain(top)
    who = _who(acc) if acc is not None else f"domain {top}"
    if kind is QuotaKind.LABEL_MEMORY:
        what = f"its running domains hold {amount} MiB (hypervisor), limit {limit} MiB"
    else:
        what = (
            f"its running domains used {amount}% CPU over the last {span:.0f} s (hypervisor), "
            f"limit {limit}%"
        )
    reason = f"label {label!r} quota {kind}: {what}; the largest user is {who}"
    return Decision(False, Hook.DOMAIN_ADMIT, Rule.QUOTA, reason, label)
