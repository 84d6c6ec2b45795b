"""Placement (pure): on which live hosts would a domain with a label be admitted now?

Each host's published running labels are replayed into a Chinese Wall running set of *this*
daemon's policy (`shyped.policy.chinese_wall.running_set`) and asked `admit(label)`. A host that
published a label this policy does not know, or runs another policy, is excluded with that
reason: the answer never rests on another host's own verdict. The destination's daemon still
decides for itself at admission (`shyped.pool.reservation`): placement is advice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from shyped.policy.chinese_wall import running_set
from shyped.policy.decisions import PolicyEngine, UnknownLabelError
from shyped.pool.records import HostState


@attrs.frozen
class HostVerdict:
    host: str
    admitted: bool
    reason: str


def place(
    engine: PolicyEngine, policy_sha256: str, label: str, hosts: Iterable[HostState]
) -> tuple[HostVerdict, ...]:
    """One verdict per host (sorted by name): admitted, or the reason it is excluded."""
    out = []
    for st in sorted(hosts, key=lambda h: h.host):
        if st.policy_sha256 != policy_sha256:
            out.append(
                HostVerdict(
                    st.host, False, f"runs another policy version (sha256 {st.policy_sha256[:16]})"
                )
            )
            continue
        try:
            running = running_set(
                engine, [name for name, n in st.running_labels.items() for _ in range(n)]
            )
        except UnknownLabelError as exc:
            out.append(
                HostVerdict(st.host, False, f"published a label this policy does not know: {exc}")
            )
            continue
        decision = running.admit(label)
        full = quota_full(engine, label, st.running_labels) if decision.permitted else None
        if full is not None:
            out.append(HostVerdict(st.host, False, full))
            continue
        out.append(HostVerdict(st.host, decision.permitted, decision.reason))
    return tuple(out)


def quota_full(engine: PolicyEngine, label: str, running: Mapping[str, int]) -> str | None:
    """Why one more domain of `label` would pass its ``max_domains`` quota on a host running
    `running` (label -> count), or None. The per-domain quotas (memory, vCPUs, devices…)
    depend on the domain's configuration and the run-time label quotas on metering: the
    destination's daemon judges those at admission, placement does not."""
    try:
        name = engine.resolve_domain(label).name
    except UnknownLabelError:
        return None  # the Chinese Wall check already refused it
    vm = engine.policy.vm_label(name)
    limit = None if vm is None else vm.quota.max_domains
    count = running.get(name, 0)
    if limit is not None and count >= limit:
        return f"quota of {name}: max_domains = {limit} and {count} run there"
    return None
