"""Pure helpers a `ControlBackend` adapter builds its answers with. No I/O.

They take the daemon's own objects (the `Policy`, its `PolicyEngine`, the Chinese Wall
`RunningSet`, the `LabelStore`) so the answers cannot drift from enforcement: a dry run asks
the same engine the daemon decides with, with the same inputs it will have when the domain
appears (its label, the backend domain's label, the resource's stored label).
"""

from __future__ import annotations

import difflib
import hashlib
import re
import uuid as uuidlib
from collections.abc import Callable, Iterable, Mapping
from typing import Final, Literal

from shyped.control.backend import (
    ChannelItem,
    DiskItem,
    DomainInfo,
    DryRunResult,
    LabelInfo,
    LabelList,
    PciItem,
    PolicyFormat,
    PolicyInfo,
    Verdict,
    VifItem,
)
from shyped.control.protocol import ControlError, ErrorCode
from shyped.core.devicekinds import CHANNEL_KINDS, unknown_kind
from shyped.core.hostfacts import Domain
from shyped.core.instances import BINDING_SEP
from shyped.core.labelstore import (
    LabelStoreError,
    bridge_resource,
    disk_resource,
    pci_resource,
)
from shyped.policy import acm_xml, toml_format
from shyped.policy.chinese_wall import RunningSet
from shyped.policy.decisions import Decision, Hook, PolicyEngine, UnknownLabelError
from shyped.policy.errors import LabelSyntaxError, PolicyError
from shyped.policy.model import LabelRef, Policy, name_problem


def label_list(policy: Policy, kind: str = "any") -> LabelList:
    """The policy's VM (`vm`), resource (`res`) or all (`any`) labels, in declaration order."""
    out: list[LabelInfo] = []
    if kind in ("vm", "any"):
        for v in policy.vm_labels:
            out.append(
                LabelInfo(
                    name=v.name,
                    label=policy.label_string(v.name),
                    type="vm",
                    ste_types=tuple(sorted(v.ste_types)),
                    cw_types=tuple(sorted(v.cw_types)),
                    mls=str(v.mls) if v.mls else None,
                    bootstrap=v.name == policy.bootstrap,
                    dynamic=v.dynamic,
                    shared_types=tuple(sorted(v.shared_types)),
                )
            )
    if kind in ("res", "any"):
        for r in policy.resource_labels:
            out.append(
                LabelInfo(
                    name=r.name,
                    label=policy.label_string(r.name),
                    type="res",
                    ste_types=(r.ste_type,),
                    mls=str(r.mls) if r.mls else None,
                    per_instance=r.per_instance,
                )
            )
    return LabelList(policy=policy.name, labels=tuple(out))


def label_name(policy: Policy, label: str) -> str:
    """A label argument (bare name or ``ACM:<policy>:<label>``) as a bare name of `policy`.

    ``invalid-argument`` if it cannot be parsed or names another policy; existence is not
    checked here (see `find_label`).
    """
    if ":" in label:
        try:
            ref = LabelRef.parse(label)
        except LabelSyntaxError as exc:
            raise ControlError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        if ref.policy != policy.name:
            raise ControlError(
                ErrorCode.INVALID_ARGUMENT,
                f"label {label!r} is of policy {ref.policy!r}, not the active {policy.name!r}",
            )
        return ref.label
    why = name_problem(label, "label name")
    if why is not None:
        raise ControlError(ErrorCode.INVALID_ARGUMENT, why)
    return label


def resource_assignment(policy: Policy, label: str) -> tuple[str, str]:
    """A resource label argument as (label name, value for the label store): a resource label
    (bare or ``ACM:<policy>:<label>``), optionally assigned to one instance of a dynamic label
    as ``<label>@<uuid>`` (docs/policy.md, "Dynamic labels")."""
    text, sep, uuid = label.rpartition(BINDING_SEP)
    if not sep:
        name = find_label(policy, label, "res").name
        return name, name
    try:
        canonical = str(uuidlib.UUID(uuid))
    except ValueError:
        raise ControlError(
            ErrorCode.INVALID_ARGUMENT,
            f"{label[:120]!r}: {uuid[:60]!r} after '@' is not a domain UUID "
            "(assign a resource to an instance as <label>@<uuid>)",
        ) from None
    if canonical != uuid.lower():
        raise ControlError(
            ErrorCode.INVALID_ARGUMENT, f"{label[:120]!r}: write the UUID as {canonical}"
        )
    name = find_label(policy, text, "res").name
    return name, f"{name}{BINDING_SEP}{canonical}"


def unknown_label(policy: Policy, name: str, kind: str) -> ControlError:
    """``unknown-label`` for `name`, with the closest labels of `kind` as suggestions."""
    what, other = ("VM", "resource") if kind == "vm" else ("resource", "VM")
    names = (
        [v.name for v in policy.vm_labels]
        if kind == "vm"
        else [r.name for r in policy.resource_labels]
    )
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    exists_other = (
        policy.resource_label(name) if kind == "vm" else policy.vm_label(name)
    ) is not None
    text = f"unknown label {name!r}"
    if close:
        text += f", did you mean {close[0]!r}?"
    text += f" (policy {policy.name!r} has no {what} label {name!r}"
    text += f"; {name!r} is a {other} label)" if exists_other else ")"
    return ControlError(
        ErrorCode.UNKNOWN_LABEL, text, {"label": name, "kind": kind, "suggestions": close}
    )


def find_label(policy: Policy, label: str, kind: str) -> LabelInfo:
    """The VM (`vm`) or resource (`res`) label named by `label`; ``unknown-label`` (with
    suggestions) if none."""
    name = label_name(policy, label)
    exists = policy.vm_label(name) if kind == "vm" else policy.resource_label(name)
    if exists is None:
        raise unknown_label(policy, name, kind)
    (info,) = [i for i in label_list(policy, kind).labels if i.name == name]
    return info


def policy_info(
    policy: Policy, raw: bytes, fmt: PolicyFormat, source: str | None = None
) -> PolicyInfo:
    """Name, version and the sha256 of the bytes the policy was loaded from."""
    return PolicyInfo(
        name=policy.name,
        version=str(policy.version),
        sha256=hashlib.sha256(raw).hexdigest(),
        format=fmt,
        source=source,
    )


def detect_format(text: str, fmt: str = "auto") -> PolicyFormat:
    """``acm-xml`` for text starting with ``<`` (after blanks/BOM), else ``toml``."""
    if fmt == "toml":
        return "toml"
    if fmt == "acm-xml":
        return "acm-xml"
    return "acm-xml" if text.lstrip("\ufeff \t\r\n").startswith("<") else "toml"


def parse_policy(text: str, filename: str, fmt: str = "auto") -> tuple[Policy, PolicyFormat]:
    """Load a policy text; ``policy-invalid`` with every problem (file:line: message)."""
    kind = detect_format(text, fmt)
    try:
        if kind == "acm-xml":
            return acm_xml.loads(text.encode("utf-8"), file=filename), kind
        return toml_format.loads(text, file=filename), kind
    except PolicyError as exc:
        problems = [str(p) for p in exc.problems]
        raise ControlError(
            ErrorCode.POLICY_INVALID,
            f"{filename}: the policy does not load ({len(problems)} problem(s))",
            {"problems": problems[:200]},
        ) from None


_UUID: Final = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


def is_uuid(text: str) -> bool:
    """Is `text` a domain UUID (8-4-4-4-12 hex digits)?"""
    return _UUID.fullmatch(text) is not None


def canonical_uuid(text: str) -> str:
    """A domain UUID as xenstore writes it (8-4-4-4-12 hex digits, lower case);
    ``invalid-argument`` for anything else (no braces, ``urn:``, bare hex or paths)."""
    if _UUID.fullmatch(text) is None:
        raise ControlError(
            ErrorCode.INVALID_ARGUMENT,
            f"{text[:80]!r} is not a domain UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)",
        )
    return text.lower()


def match_domain(ref: str, domains: Iterable[DomainInfo]) -> DomainInfo:
    """The domain `ref` names: a domid, then a UUID, then a unique name; ``not-found``."""
    doms = [d for d in domains if d.state != "gone"]
    if ref.isdecimal() and len(ref) < 12:
        for d in doms:
            if d.domid == int(ref):
                return d
    low = ref.lower()
    for d in doms:
        if d.uuid is not None and d.uuid.lower() == low:
            return d
    named = [d for d in doms if d.name == ref]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        ids = ", ".join(str(d.domid) for d in named)
        raise ControlError(
            ErrorCode.INVALID_ARGUMENT, f"{len(named)} domains are named {ref!r} ({ids})"
        )
    raise ControlError(ErrorCode.NOT_FOUND, f"no domain {ref[:80]!r} (name, domid or uuid)")


def domain_info(
    dom: Domain, label: str | None, cpu_seconds: Mapping[int, float] | None = None
) -> DomainInfo:
    """One row of ``list`` (``xl list -Z``'s columns) for a domain of the host model."""
    memory = dom.memory_target_kib if dom.memory_target_kib is not None else None
    vcpus = dom.vcpus_online if dom.vcpus_online is not None else dom.vcpus
    return DomainInfo(
        domid=dom.domid,
        name=dom.name,
        uuid=dom.uuid,
        label=label,
        state=dom.state.value,
        reason=dom.decision.reason if dom.decision is not None else None,
        memory_mib=None if memory is None else memory // 1024,
        vcpus=vcpus,
        cpu_seconds=None if cpu_seconds is None else cpu_seconds.get(dom.domid),
    )


def shown_label(d: DomainInfo) -> str | None:
    """A domain's label as ``list`` and ``getlabel`` print it: ``ACM:<policy>:<label>``, and
    the instance in brackets for a dynamic label (``ACM:hosting:web [web#3f…]``)."""
    if d.label is None or d.instance is None:
        return d.label
    return f"{d.label} [{d.instance}]"


Kind = Literal["domain", "disk", "vif", "pci", "device"]


def _verdict(item: str, kind: Kind, d: Decision) -> Verdict:
    return Verdict(item=item, kind=kind, permitted=d.permitted, reason=str(d), rule=str(d.rule))


def _worst(item: str, kind: Kind, decisions: Iterable[Decision]) -> Verdict:
    """The first denial among `decisions`, else a permit naming what was checked."""
    ds = list(decisions)
    for d in ds:
        if not d.permitted:
            return _verdict(item, kind, d)
    reason = "; ".join(str(d) for d in ds)
    return Verdict(item=item, kind=kind, permitted=True, reason=reason, rule=None)


def _acm_label_verdict(engine: PolicyEngine, subject: str, label: str | None) -> Verdict:
    what = f"domain {subject}"
    try:
        lab = engine.resolve_domain(label)
    except UnknownLabelError as exc:
        return Verdict(what, "domain", False, f"deny: {exc.reason}", str(exc.rule))
    why = f"label {lab.name!r} exists (ACM view: Chinese Wall against running domains not checked)"
    return Verdict(what, "domain", True, why, None)


def dry_run(
    engine: PolicyEngine,
    *,
    subject: str,
    label: str | None,
    running: RunningSet | None,
    disks: Iterable[DiskItem],
    vifs: Iterable[VifItem],
    domain_label: Callable[[int], str | None],
    resource_label: Callable[[str], str | None],
    pcis: Iterable[PciItem] = (),
    channels: Iterable[ChannelItem] = (),
    backend_label: Callable[[str], str | None] | None = None,
    acm_only: bool = False,
    narrow: Callable[[str, Decision], Decision] | None = None,
) -> DryRunResult:
    """Would a domain labelled `label` and each of its devices be admitted now?

    `running` is the Chinese Wall running set for a *new* domain (an admission item is
    included), None for devices of a running domain. `domain_label(domid)` gives a backend
    domain's label (dom0: the bootstrap label), `resource_label(resource_id)` a resource's
    stored label (None: unlabelled). Each device gets the first denial among its checks:
    the device channel to its backend (STE/MLS), then the resource (STE/MLS, writable or not).

    `narrow(resource_id, decision)`: the instance rules of a dynamic label
    (`shyped.policy.instances`) on each resource decision.

    `acm_only`: Xen ACM's ``xm dry-run`` (``tools/python/xen/xm/dry-run.py``, 4.1.0): the
    label resolves (no Chinese Wall against running domains), each disk's resource label
    against it; no device channels, no vifs.
    """
    items: list[Verdict] = []
    if running is not None and acm_only:
        items.append(_acm_label_verdict(engine, subject, label))
    elif running is not None:
        items.append(_verdict(f"domain {subject}", "domain", running.admit(label)))
    for disk in disks:
        what = f"disk {disk.vdev}" + (f" ({disk.target})" if disk.target else "")
        checks = []
        if not acm_only:
            checks.append(
                engine.channel(Hook.DEVICE_CHANNEL, label, domain_label(disk.backend_domid))
            )
        if disk.target:
            try:
                rid = disk_resource(disk.target)
            except LabelStoreError as exc:
                items.append(Verdict(what, "disk", False, f"deny resource: {exc}", "label"))
                continue
            d = engine.resource(label, resource_label(rid), writable=disk.writable)
            checks.append(narrow(rid, d) if narrow is not None else d)
        if checks:
            items.append(_worst(what, "disk", checks))
    for n, vif in enumerate(() if acm_only else vifs):
        devid = vif.devid if vif.devid is not None else n
        what = f"vif {devid} (bridge {vif.bridge})"
        checks = [engine.channel(Hook.DEVICE_CHANNEL, label, domain_label(vif.backend_domid))]
        try:
            rid = bridge_resource(vif.bridge)
        except LabelStoreError as exc:
            items.append(Verdict(what, "vif", False, f"deny resource: {exc}", "label"))
            continue
        d = engine.resource(label, resource_label(rid), writable=True)
        checks.append(narrow(rid, d) if narrow is not None else d)
        items.append(_worst(what, "vif", checks))
    items += device_verdicts(
        engine,
        label,
        pcis,
        channels,
        domain_label=domain_label,
        resource_label=resource_label,
        backend_label=backend_label,
        narrow=narrow,
    )
    return DryRunResult(permitted=all(i.permitted for i in items), items=tuple(items))


def device_verdicts(
    engine: PolicyEngine,
    label: str | None,
    pcis: Iterable[PciItem],
    channels: Iterable[ChannelItem],
    *,
    domain_label: Callable[[int], str | None],
    resource_label: Callable[[str], str | None],
    backend_label: Callable[[str], str | None] | None,
    narrow: Callable[[str, Decision], Decision] | None = None,
) -> list[Verdict]:
    """The dry run's PCI devices (STE with dom0's pciback, then the device's resource label,
    as the daemon decides ``/libxl/pci`` records) and other devices: a kind the daemon
    decides by STE with its backend alone (vtpm, vkbd, console) is checked so; any other
    kind (vusb, …) is denied as the daemon denies it."""
    items: list[Verdict] = []
    for pci in pcis:
        what = f"pci {pci.bdf}"
        checks = [engine.channel(Hook.DEVICE_CHANNEL, label, domain_label(0))]
        try:
            rid = pci_resource(pci.bdf)
        except LabelStoreError as exc:
            items.append(Verdict(what, "pci", False, f"deny resource: {exc}", "label"))
            continue
        d = engine.resource(label, resource_label(rid), writable=True)
        checks.append(narrow(rid, d) if narrow is not None else d)
        items.append(_worst(what, "pci", checks))
    for ch in channels:
        what = f"{ch.kind} (backend {ch.backend})"
        unknown = unknown_kind(ch.kind)
        if unknown is not None or ch.kind not in CHANNEL_KINDS:
            reason = f"device kind {ch.kind!r} is not understood by shyped: denied"
            items.append(Verdict(what, "device", False, str(unknown or reason), "label"))
            continue
        if backend_label is not None:
            be_label = backend_label(ch.backend)
        else:
            be_label = domain_label(int(ch.backend)) if ch.backend.isdecimal() else None
        checks = [engine.channel(Hook.DEVICE_CHANNEL, label, be_label)]
        items.append(_worst(what, "device", checks))
    return items
