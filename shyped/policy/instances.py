"""Dynamic labels at the resource hook: which resources an instance may use (pure).

A dynamic VM label (`shyped.policy.model.VmLabel.dynamic`) is a template: each domain started
with it runs as its own instance (identity: `shyped.core.instances`). Between two domains,
`shyped.policy.decisions.PolicyEngine.channel` already keeps instances apart (a type private to
both counts for neither). Resources need the instance itself, which the policy alone does not
know: a resource assignment may name one instance (label store ``"<label>@<uuid>"``), and

- a resource assigned to an instance may be used by that instance only (the domain with that
  UUID, running as an instance), by no other domain;
- a resource whose label is ``per_instance`` must be assigned to an instance: unassigned, no
  domain may use it;
- every other resource is the template's to share: the policy's decision as it stands (`base`).
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
    if bound_to is not None:
        if domain_uuid is None or domain_uuid.lower() != bound_to.lower():
            who = f"domain {domain_uuid or '?'} ({base.subject_label!r})"
            if domain_uuid is None:
                who = f"a domain labelled {base.subject_label!r} (not an instance)"
            reason = (
                f"resource {base.object_label!r} is assigned to the instance of domain "
                f"{bound_to} only; {who} is not that instance"
            )
            return attrs.evolve(base, permitted=False, rule=Rule.STE, reason=reason)
        return attrs.evolve(base, reason=f"{base.reason}; assigned to this instance")
    res = policy.resource_label(base.object_label or "")
    if res is not None and res.per_instance:
        reason = (
            f"resource label {res.name!r} is per instance: the resource must be assigned to "
            f'one instance (label store "{res.name}@<uuid>") before any domain may use it'
        )
        return attrs.evolve(base, permitted=False, rule=Rule.STE, reason=reason)
    return base
