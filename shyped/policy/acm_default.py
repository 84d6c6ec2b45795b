"""Xen ACM's DEFAULT policy: what ``xm resetpolicy`` returned a host to. Pure.

ACM (Xen 4.1.0, ``tools/python/xen/util/acmpolicy.py``: ``DEFAULT_policy``,
``get_reset_policy_xml``, ``is_default_policy``) shipped a built-in policy named ``DEFAULT``,
version 1.0: STE types ``SystemManagement`` and ``__UNLABELED__``, Chinese Wall type
``SystemManagement`` and no conflict sets; VM labels ``SystemManagement`` (the bootstrap label,
both STE types) and ``__UNLABELED__``, resource label ``__UNLABELED__``. A reset built it with
``from="<dom0's current label>"`` on ``SystemManagement``, so dom0 carried over whatever label
it ran with. ACM skipped the policy version check when either side of an update was the
DEFAULT policy (``ACMPolicy.update``); `shyped.policy.update.check_update` does the same
(`is_default_policy`).

This module builds the policy from the model (the description above), not from ACM's text.
"""

from __future__ import annotations

from typing import Final

from shyped.policy.model import (
    Defaults,
    Policy,
    PolicyVersion,
    ResourceLabel,
    VmLabel,
)

DEFAULT_NAME: Final = "DEFAULT"
SYSTEM: Final = "SystemManagement"
UNLABELED: Final = "__UNLABELED__"


def default_policy(dom0_label: str | None = None) -> Policy:
    """ACM's DEFAULT policy; `dom0_label` (dom0's label under the current policy) becomes
    the ``from=`` of ``SystemManagement``, as ``xm resetpolicy`` wrote it."""
    frm = dom0_label if dom0_label and dom0_label != SYSTEM else None
    return Policy(
        name=DEFAULT_NAME,
        version=PolicyVersion(1, 0),
        bootstrap=SYSTEM,
        ste_types=(SYSTEM, UNLABELED),
        cw_types=(SYSTEM,),
        vm_labels=(
            VmLabel(SYSTEM, ste_types={SYSTEM, UNLABELED}, from_name=frm),
            VmLabel(UNLABELED, ste_types={UNLABELED}),
        ),
        resource_labels=(ResourceLabel(UNLABELED, UNLABELED),),
        defaults=Defaults(unlabelled_domain=UNLABELED, unlabelled_resource=UNLABELED),
    )


def is_default_policy(policy: Policy) -> bool:
    """Is `policy` ACM's DEFAULT policy (by content, as ACM's ``is_default_policy`` judged:
    its VM labels, bootstrap label and STE types; names and renames aside)?"""
    vms = [v.name for v in policy.vm_labels]
    if vms != [SYSTEM, UNLABELED] or policy.bootstrap != SYSTEM:
        return False
    if list(policy.ste_types) != [SYSTEM, UNLABELED]:
        return False
    system = policy.vm_label(SYSTEM)
    return system is not None and system.ste_types == frozenset({SYSTEM, UNLABELED})
