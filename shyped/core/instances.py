"""Instances of dynamic labels: identity, the running instances, and resource bindings (pure).

A domain admitted with a dynamic label (docs/policy.md, "Dynamic labels") runs as the instance
``<template>#<id>``, where ``<id>`` is the first `INSTANCE_HEX` hex digits (64 bits) of
SHA-256 over the domain's UUID. The UUID comes from the dom0-only ``/local/domain/<d>/vm``
pointer and ``/vm/<uuid>`` (libxl's records, `shyped.core.assembler.local`), never from a
node the guest may write, so a guest cannot choose its instance; the same UUID gives the same
instance after a restart, another UUID another one. Two running domains never hold one
instance: a UUID already held is an identity problem (denied by the daemon), and a hash
collision between two UUIDs denies the later domain (`Instances.probe`: fail closed).

`Instances` is the engine's table of running instances; it is claimed at admission and given
up when the domain is gone, denied, or no longer runs with a dynamic label (policy switch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Final

import attrs

from shyped.core.labelstore import LabelStore
from shyped.policy.decisions import (
    Decision,
    Hook,
    LabelInput,
    PolicyEngine,
    Rule,
    UnknownLabelError,
)
from shyped.policy.instances import instance_resource
from shyped.policy.model import Policy

#: Hex digits of the instance id (64 bits: a collision among 10,000 running domains has a
#: chance of about 3e-12, and is denied, never merged).
INSTANCE_HEX: Final = 16
#: Separates the template and the instance id in an instance's name.
INSTANCE_SEP: Final = "#"
#: Separates a resource's label and the UUID of the instance it is assigned to (label store).
BINDING_SEP: Final = "@"
_DOMAIN: Final = b"shyped-instance-v1\0"


def instance_id(uuid: str) -> str:
    """The instance id of the domain with `uuid` (case-insensitive)."""
    return hashlib.sha256(_DOMAIN + uuid.lower().encode("ascii")).hexdigest()[:INSTANCE_HEX]


@attrs.frozen
class Instance:
    """The instance a domain runs as: its template, its UUID and the id derived from it."""

    template: str
    uuid: str
    ident: str

    @classmethod
    def of(cls, template: str, uuid: str) -> Instance:
        return cls(template, uuid.lower(), instance_id(uuid))

    @property
    def name(self) -> str:
        """``<template>#<id>``: how list, getlabel and the audit trail show it."""
        return f"{self.template}{INSTANCE_SEP}{self.ident}"


def split_binding(label: str) -> tuple[str, str | None]:
    """A label store's resource label ``"<label>"`` or ``"<label>@<uuid>"`` as (label, uuid)."""
    name, sep, uuid = label.partition(BINDING_SEP)
    return (name, uuid.lower()) if sep else (label, None)


def dynamic_label(policy: Policy, label: str | None) -> str | None:
    """`label` if it is a dynamic VM label of `policy`, else None."""
    vm = policy.vm_label(label) if label is not None else None
    return label if vm is not None and vm.dynamic else None


def instance_rules(
    engine: PolicyEngine,
    label: LabelInput,
    uuid: str | None,
    store: LabelStore,
    resolve: Callable[[str], str],
) -> Callable[[str, Decision], Decision]:
    """For a dry run: the instance rules (`shyped.policy.instances`) on a resource decision
    (resource id, decision) of a domain with `uuid` labelled `label`, an instance if the label
    is dynamic; resource bindings from `store` (ids through `resolve`)."""
    try:
        dynamic = engine.resolve_domain(label).dynamic
    except UnknownLabelError:
        dynamic = False
    own = uuid if dynamic else None

    def narrow(rid: str, d: Decision) -> Decision:
        bound = store.resource_binding(resolve(rid))[1]
        return instance_resource(engine.policy, d, bound_to=bound, domain_uuid=own)

    return narrow


class Instances:
    """The running instances: domid -> `Instance`, and which domain holds each id."""

    def __init__(self) -> None:
        self._of: dict[int, Instance] = {}
        self._holder: dict[str, int] = {}

    def get(self, domid: int) -> Instance | None:
        return self._of.get(domid)

    def __iter__(self) -> Iterator[tuple[int, Instance]]:
        return iter(list(self._of.items()))

    def __len__(self) -> int:
        return len(self._of)

    def probe(self, domid: int, template: str, uuid: str) -> tuple[Instance, int | None]:
        """The instance `domid` would run as, and the other domain already holding its id
        (None: free). Changes nothing."""
        inst = Instance.of(template, uuid)
        holder = self._holder.get(inst.ident)
        return inst, (holder if holder is not None and holder != domid else None)

    def admission(
        self, policy: Policy, domid: int, label: str | None, uuid: str | None
    ) -> tuple[Instance | None, Decision | None]:
        """The instance `domid` would run as under `label` (None: not a dynamic label), and a
        denial if it cannot: no UUID, or the id is held by another running domain (a hash
        collision or a duplicate UUID: fail closed). Changes nothing."""
        if label is None or dynamic_label(policy, label) is None:
            return None, None
        if uuid is None:
            why = f"dynamic label {label!r} needs the domain's UUID to derive its instance"
            return None, Decision(False, Hook.DOMAIN_ADMIT, Rule.LABEL, why, label)
        inst, holder = self.probe(domid, label, uuid)
        if holder is None:
            return inst, None
        why = (
            f"instance {inst.name} (from UUID {uuid}) is already held by domain {holder}: "
            "two running domains never share an instance (fail closed)"
        )
        return inst, Decision(False, Hook.DOMAIN_ADMIT, Rule.LABEL, why, label)

    def claim(self, domid: int, inst: Instance) -> None:
        """`domid` runs as `inst` (after a `probe` that found it free)."""
        self.release(domid)
        self._of[domid] = inst
        self._holder[inst.ident] = domid

    def release(self, domid: int) -> Instance | None:
        """`domid` no longer runs as an instance; returns the one it had."""
        inst = self._of.pop(domid, None)
        if inst is not None and self._holder.get(inst.ident) == domid:
            del self._holder[inst.ident]
        return inst

    def retain(self, template_of: Callable[[int], str | None]) -> None:
        """Keep the instances whose domain still runs with a dynamic label (`template_of`
        returns it, None: give the instance up), under that label's (new) name."""
        for domid, inst in list(self._of.items()):
            template = template_of(domid)
            if template is None:
                self.release(domid)
            elif template != inst.template:
                self._of[domid] = attrs.evolve(inst, template=template)
