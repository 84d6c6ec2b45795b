"""Dynamic labels at the resource hook: which resources an instance may use (pure).

A dynamic VM label (`shyped.policy.model.VmLabel.dynamic`) is a template: each domain started
with it runs as its own instance (identity: `shyped.core.instances`). Between two domains,
`shyped.policy.decisions.PolicyEngine.channel` already keeps instances apart (a type private to
both counts for neither). Resources need the instance itself, which the policy alone does not
know: a resource assignment may name one instance (label store ``"<label>@<uuid>"``), and

- a resource assigned to an instance may be used by that instance only (the domain with that
  UUID, running with a dynamic label that holds the resource's type), by no other domain;
- an instance may use a resource of one of its template's *private* types only if the resource
  is assigned to it; resources of the template's shared types need no assignment.

Everything else is the policy's decision as it stands (`base`).
"""

from __future__ import annotations

import attrs

from shyped.policy.decisions import Decision, Rule
from shyped.policy.model import Policy


def instance_resource(
    policy: Policy,
    base: Decision,
    *,
    bound_to: str | None,
    domain_uuid: str | None,
) -> Decision:
    """`base` (the policy's resource decision for a domain with UUID `domain_uuid`) narrowed by
    the instance rules above; `bound_to` is the UUID the resource is assigned to, if any."""
    if not base.permitted:
        return base
    vm = policy.vm_label(base.subject_label or "")
    res = policy.resource_label(base.object_label or "")
    dynamic = vm is not None and vm.dynamic
    if bound_to is not None:
        if not dynamic or domain_uuid is None or domain_uuid.lower() != bound_to.lower():
            who = f"domain {domain_uuid or '?'} ({base.subject_label!r})"
            reason = (
                f"resource {base.object_label!r} is assigned to the instance of domain "
                f"{bound_to} only; {who} is not that instance"
            )
            return attrs.evolve(base, permitted=False, rule=Rule.STE, reason=reason)
        return attrs.evolve(base, reason=f"{base.reason}; assigned to this instance")
    if vm is not None and res is not None and res.ste_type in vm.private_types:
        reason = (
            f"STE type {res.ste_type!r} of resource {res.name!r} is private to each instance "
            f"of dynamic label {vm.name!r}: the resource must be assigned to one instance "
            f'(label store "{res.name}@<uuid>")'
        )
        return attrs.evolve(base, permitted=False, rule=Rule.STE, reason=reason)
    return base
