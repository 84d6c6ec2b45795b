"""Vetoes and fail-closed checks shared by the engine's hooks (pure): which veto a question's
hook plans, and the denials that come before the policy (a party denied admission)."""

from __future__ import annotations

from typing import cast

from shyped.core.actions import Action, CutDevice, RemoveNode, RemoveVchan, ResetPerms, VetoDomain
from shyped.core.channels import ChannelKey
from shyped.core.events import DeviceKey
from shyped.core.host import HostModel
from shyped.core.hostfacts import DomainState, NeedsDecision, VchanKey
from shyped.core.modes import DomainVeto
from shyped.policy.decisions import Decision, Hook, Rule


def veto_for(need: NeedsDecision, host: HostModel, domain_veto: DomainVeto) -> tuple[Action, str]:
    """The veto a denial of `need` plans, and what the question is about (for log lines)."""
    if need.kind == "domain":
        return VetoDomain(need.domid, domain_veto), f"domain {need.domid}"
    if need.kind == "device":
        key = cast(DeviceKey, need.key)
        dev = host.device(key)
        veto: Action = CutDevice(key, need.peers[0], dev.backend_kind if dev else key.kind)
        if dev is not None and dev.emulated:  # the device model keeps it: the domain goes
            veto = VetoDomain(need.domid, domain_veto)
        return veto, f"device {key.kind} {need.domid}/{key.devid}"
    if need.kind == "channel":
        ckey = cast(ChannelKey, need.key)
        if need.over_limit:
            return RemoveNode(need.domid, ckey.path), f"xs-channel {ckey.path}"
        return ResetPerms(need.domid, ckey.path), f"xs-channel {ckey.path}"
    vkey = cast(VchanKey, need.key)
    return RemoveVchan(need.domid, vkey.path), f"vchan {vkey.path}"


def exemption(host: HostModel, domid: int, role: str, domain_veto: DomainVeto) -> str:
    """Why a veto is left to the domain's own veto: it is being destroyed."""
    dom = host.domain(domid)
    if dom is not None and dom.state is DomainState.DENIED and domain_veto is DomainVeto.DESTROY:
        return f"{role} domain {domid} is being destroyed"
    return ""


def denied_party(
    hook: Hook, host: HostModel, domids: tuple[int, ...], subject: str | None
) -> Decision | None:
    """A deny if one of `domids` is a domain denied admission (fail closed)."""
    for d in domids:
        dom = host.domain(d)
        if dom is not None and dom.state is DomainState.DENIED:
            return Decision(
                False,
                hook,
                Rule.DENIED_DOMAIN,
                f"domain {d} is denied admission: nothing it is party to is permitted",
                subject,
                dom.label,
            )
    return None
