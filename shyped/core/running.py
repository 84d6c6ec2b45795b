"""The running system as the policy update check sees it: the host model's domains, channels and
resources in the policy's terms (`shyped.policy.update.RunningSystem`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from shyped.core.hostfacts import RunningSystem as HostRunningSystem
from shyped.core.labelstore import LAYERED_FORMATS, LabelStore
from shyped.core.outcome import (
    resource_of,
)
from shyped.policy import update
from shyped.policy.decisions import Decision, Hook, Rule


def _as_is(rid: str) -> str:
    return rid


def _invalid_resource(raw: str) -> Decision:
    if raw.startswith("hotplug-script:"):
        script = raw[len("hotplug-script:") :]
        reason = (
            f"the device's hotplug script {script[:200]!r} is not the default (block, "
            "vif-bridge): what it reaches is not the resource the label store names"
        )
    elif raw.startswith(LAYERED_FORMATS):
        reason = (
            f"disk {raw[:200]!r} is a qcow/qcow2/vhd/qed image: its header may name backing "
            "files the backend opens too, which no label covers (use raw images)"
        )
    else:
        reason = f"resource {raw[:200]!r} is not a valid resource id (absolute path or bridge)"
    return Decision(permitted=False, hook=Hook.RESOURCE, rule=Rule.LABEL, reason=reason)


def adapt_running_system(
    system: HostRunningSystem,
    labels: LabelStore,
    counted: Mapping[int, str] | None = None,
    *,
    resolve: Callable[[str], str] = _as_is,
) -> update.RunningSystem:
    """`shyped.core.hostfacts.RunningSystem` -> `shyped.policy.update.RunningSystem`.

    A domain's label is the one it is counted with (else the one recorded in the host model);
    a resource's label comes from the label store (None: unlabelled).
    """
    counted = counted or {}
    domains = tuple(
        update.RunningDomain(d.domid, counted.get(d.domid, d.label), d.name) for d in system.domains
    )
    channels = tuple(update.LiveChannel(c.dom_a, c.dom_b, c.kind) for c in system.channels)
    resources = []
    for r in system.resources:
        rid = resource_of(r.kind, r.resource)
        if rid is not None:
            rid = resolve(rid)
        rlabel = labels.resource_label(rid) if rid is not None else None
        resources.append(update.ResourceInUse(r.domid, rlabel, r.writable, rid or r.resource))
    return update.RunningSystem(domains, channels, tuple(resources))
