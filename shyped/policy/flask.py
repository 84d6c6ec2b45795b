"""Compile an sHype policy to a Xen FLASK policy module (pure: text in, text out, no I/O).

The output is one FLASK module (``shype.te``) written with the macros of Xen's own policy tree
(``tools/flask/policy/modules/xen.if``: ``declare_domain``, ``create_domain``,
``manage_domain``, ``domain_comms``, ``domain_self_comms`` …). `shyped.service.flaskbuild`
puts it in place of Xen's example domU modules, runs m4 as Xen's ``Makefile.common`` does and
compiles the result with ``checkpolicy -t Xen``. docs/flask.md describes the mapping.

Mapping:

- every VM label ``L`` → the domain type ``shype_<enc(L)>_t`` (`type_name`);
- dom0 keeps Xen's ``dom0_t`` (``dom0.te``: its control of Xen itself) and communicates as
  the bootstrap label does; ``create_domain``/``manage_domain``/``migrate_domain_out`` give it
  the control it needs to build and manage domains of every label;
- unlabelled domains (Xen's initial SIDs ``domU`` and ``domDM``, i.e. ``xl create`` without
  ``seclabel=``) → ``shype__unlabelled_t`` (aliases ``domU_t``, ``dm_dom_t``), communicating
  as the policy's `Defaults` say (not at all when unlabelled domains are denied); dom0 may
  relabel such a domain to any label type;
- a running domain relabelled by the daemon (``shypectl addlabel L mgt DOMAIN``): dom0 may
  relabel between the types of the non-dynamic labels (`relabel_types`), the only relabels
  the daemon's check can allow, and the domain keeps ``send``/``status`` on the channels of
  its old type;
- two domain types whose labels the engine lets set up a two-way channel
  (`PolicyEngine.channel` at `Hook.EVTCHN`: a common STE type, equal MLS labels where both
  carry one) → ``domain_comms`` (event channels and grant maps both ways); a label with itself
  → ``domain_comms(T, T)`` (two domains of that label) and ``domain_self_comms(T)`` (a domain
  with itself), only where the engine permits it; nothing else between guests.
- a dynamic label (docs/policy.md) is one type for all its instances: two domains of the label
  are always two instances, so ``domain_comms(T, T)`` is granted exactly when the engine lets
  two instances talk (through a shared type), and ``domain_self_comms(T)`` (an instance with
  itself) always. The channel relation is exact; per-instance resources stay the daemon's,
  as every resource label does.

Bootstrap (`BOOTSTRAP_RULES`): ``xl create -p`` of an unlabelled domain has libxl allocate its
xenstore and console event channels with dom0 while building it, and the daemon relabels it
afterwards (``shyped.service.flaskxen``). So dom0 and unlabelled domains always get event
channels (``domain_event_comms``, no grants) even where the policy denies unlabelled domains,
and every label type may keep using (``send``, ``status``) a channel created while its domain
was unlabelled (``shype__unlabelled_t_channel``). An unlabelled domain still reaches no other
guest, and the daemon vetoes it unless the policy's defaults admit it.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

from shyped.policy.decisions import Hook, PolicyEngine
from shyped.policy.model import Policy

#: dom0's type in Xen's policy tree (``modules/xen.te``: a singleton domain).
DOM0_TYPE: Final = "dom0_t"
#: The type of domains created without a label (Xen's initial SIDs domU and domDM).
UNLABELLED_TYPE: Final = "shype__unlabelled_t"
#: Xen's type names for those initial SIDs (``policy/initial_sids``), aliased to it.
UNLABELLED_ALIASES: Final = ("domU_t", "dm_dom_t")
#: FLASK's ``event`` permissions a relabelled domain keeps on the channels it got unlabelled.
BOOTSTRAP_CHANNEL_PERMS: Final = ("send", "status")
#: FLASK attributes of the types a running domain may be relabelled between, and their
#: channel types (`relabel_types`).
RELABEL_ATTR: Final = "shype_relabel_domain"
RELABEL_CHANNEL_ATTR: Final = "shype_relabel_channel"
#: FLASK user and role of every domain context (Xen's ``system_u``/``system_r``).
CONTEXT_PREFIX: Final = "system_u:system_r:"
#: The name of the generated module (``<name>.te``).
MODULE_NAME: Final = "shype"
#: Xen's policy modules the generated one is compiled with, in order (``modules.conf``).
#: Left out: guest_features (lets every domain send Argo messages to every other), the example
#: domain types (domU, isolated_domU, prot_domU, nomigrate, nic_dev), the xenstore stub domain
#: and vm_role (its users constrain channels by FLASK user, which the sHype policy has none of).
XEN_MODULES_BEFORE: Final = ("xen", "dom0")
XEN_MODULES_AFTER: Final = ("all_system_role",)

_KEEP: Final = re.compile(r"[A-Za-z0-9]")
_COMMENT_SAFE: Final = re.compile(r"[A-Za-z0-9._+()-]*")


def encode_name(name: str) -> str:
    """`name` as a FLASK (and m4-inert) identifier fragment; injective.

    ASCII letters and digits stay, ``_`` becomes ``__`` and every other character becomes
    ``_x`` and two hex digits per byte of its UTF-8 encoding (``web.1`` → ``web_x2e1``).
    Decoding is unambiguous: after a ``_`` comes either ``_`` or ``x`` and two hex digits.
    """
    out: list[str] = []
    for ch in name:
        if _KEEP.fullmatch(ch):
            out.append(ch)
        elif ch == "_":
            out.append("__")
        else:
            out.extend(f"_x{b:02x}" for b in ch.encode("utf-8"))
    return "".join(out)


def type_name(label: str) -> str:
    """The FLASK domain type of VM label `label`: ``shype_<encode_name(label)>_t``.

    Never equal to `UNLABELLED_TYPE` (its fragment ``_unlabelled`` is no valid encoding), to
    Xen's own types (prefix ``shype_``) or to the ``_self``/``_channel`` types the macros derive.
    """
    return f"shype_{encode_name(label)}_t"


def _comment(text: str) -> str:
    """`text` if it is safe in an m4-processed comment line, else its encoding."""
    return text if _COMMENT_SAFE.fullmatch(text) else f"(encoded) {encode_name(text)}"


@attrs.frozen
class Subject:
    """One FLASK domain type and the sHype label it stands for (None: unlabelled)."""

    type: str
    label: str | None


@attrs.frozen
class FlaskPolicy:
    """The compiled module and the relation it encodes (for tests, docs and reports).

    `subjects`: every domain type of the policy (dom0's first). `comms`: the unordered pairs
    of types (sorted; a type with itself for same-label channels) given ``domain_comms``.
    """

    module: str
    subjects: tuple[Subject, ...]
    comms: frozenset[tuple[str, str]]


def subjects(policy: Policy) -> tuple[Subject, ...]:
    """dom0 (as the bootstrap label), one type per VM label, and unlabelled domains."""
    out = [Subject(DOM0_TYPE, policy.bootstrap)]
    out.extend(Subject(type_name(lab.name), lab.name) for lab in policy.vm_labels)
    out.append(Subject(UNLABELLED_TYPE, None))
    return tuple(out)


def context(label: str | None) -> str:
    """The FLASK security context a domain labelled `label` runs with (None: unlabelled)."""
    return f"{CONTEXT_PREFIX}{UNLABELLED_TYPE if label is None else type_name(label)}"


def may_communicate(engine: PolicyEngine, a: str | None, b: str | None) -> bool:
    """The engine's two-way channel decision between domains labelled `a` and `b`.

    The same call the daemon makes for event channels; STE and MLS make it symmetric.
    """
    return engine.channel(Hook.EVTCHN, a, b).permitted


def _dynamic(policy: Policy, label: str) -> bool:
    vm = policy.vm_label(label)
    return vm is not None and vm.dynamic


def relabel_types(policy: Policy) -> tuple[str, ...]:
    """The types of the labels a running domain may be relabelled from and to in Xen: every
    VM label but the dynamic ones (``shyped.core.relabel``: an instance is made at admission
    only). Which of these relabels the daemon applies depends on the running system (Chinese
    Wall, live channels, resources): its check runs before Xen is asked."""
    return tuple(type_name(lab.name) for lab in policy.vm_labels if not lab.dynamic)


def _running_relabel_rules(policy: Policy) -> list[str]:
    types = relabel_types(policy)
    if not types:
        return []
    lines = [
        "",
        f"# Relabel of a running domain (shypectl addlabel L mgt): dom0 between the {RELABEL_ATTR}",
        "# types (no dynamic label); the domain keeps using (send, status) the channels it",
        "# opened under its old type",
        f"attribute {RELABEL_ATTR};",
        f"attribute {RELABEL_CHANNEL_ATTR};",
    ]
    for t in types:
        lines += [
            f"typeattribute {t} {RELABEL_ATTR};",
            f"typeattribute {t}_channel {RELABEL_CHANNEL_ATTR};",
        ]
    perms = " ".join(BOOTSTRAP_CHANNEL_PERMS)
    lines += [
        f"allow {DOM0_TYPE} {RELABEL_ATTR}:domain2 relabelfrom;",
        f"allow {RELABEL_ATTR} {RELABEL_ATTR}:domain transition;",
        f"allow {RELABEL_ATTR} {RELABEL_CHANNEL_ATTR}:event {{ {perms} }};",
    ]
    return lines


def compile_policy(policy: Policy) -> FlaskPolicy:
    """The FLASK module for `policy` (see the module docstring for the mapping)."""
    engine = PolicyEngine(policy)
    subs = subjects(policy)
    guests = [s for s in subs if s.type != DOM0_TYPE]
    lines: list[str] = [
        f"# Generated by shyped from sHype policy {_comment(policy.name)} "
        f"version {policy.version}. Do not edit.",
        "#",
        "# VM label -> FLASK domain type:",
    ]
    lines += [f"#   {_comment(s.label)} -> {s.type}" for s in guests if s.label is not None]
    lines += [
        f"#   dom0 (bootstrap label {_comment(policy.bootstrap)}) -> {DOM0_TYPE}",
        f"#   unlabelled domains -> {UNLABELLED_TYPE}",
        "",
        "# Domain types",
    ]
    for s in guests:
        lines.append(f"declare_domain({s.type})")
    aliases = " ".join(UNLABELLED_ALIASES)
    lines += [
        f"typealias {UNLABELLED_TYPE} alias {{ {aliases} }};",
        "",
        "# What every guest may ask of Xen itself (Xen's guest_features, without Argo)",
        "allow domain_type xen_t:xen2 pmu_use;",
        "allow domain_type xen_t:version { xen_extraversion xen_compile_info xen_capabilities",
        "    xen_changeset xen_pagesize xen_guest_handle };",
        "dontaudit domain_type xen_t:version { xen_commandline xen_build_id };",
        "# Guests' early console output to Xen's console: denied as by a non-debug Xen without",
        "# XSM, and not audited (as Xen's guest_features does when its boolean is off)",
        "dontaudit domain_type xen_t:xen writeconsole;",
        "",
        "# dom0 builds, manages and may relabel unlabelled domains to every label",
    ]
    for s in guests:
        lines += [
            f"create_domain({DOM0_TYPE}, {s.type})",
            f"manage_domain({DOM0_TYPE}, {s.type})",
            f"migrate_domain_out({DOM0_TYPE}, {s.type})",
        ]
    lines.append(f"allow {DOM0_TYPE} {UNLABELLED_TYPE}:domain2 relabelfrom;")
    for s in guests:
        if s.label is not None:
            lines += [
                f"allow {DOM0_TYPE} {s.type}:domain2 relabelto;",
                f"allow {UNLABELLED_TYPE} {s.type}:domain transition;",
            ]
    lines += _running_relabel_rules(policy)
    lines += [
        "",
        "# Bootstrap: libxl builds an unlabelled domain's xenstore and console event channels",
        "# with dom0; the daemon then relabels it, and the channels stay usable",
    ]
    if not may_communicate(engine, policy.bootstrap, None):
        lines.append(f"domain_event_comms({DOM0_TYPE}, {UNLABELLED_TYPE})")
    perms = " ".join(BOOTSTRAP_CHANNEL_PERMS)
    for s in guests:
        if s.label is not None:
            lines.append(f"allow {s.type} {UNLABELLED_TYPE}_channel:event {{ {perms} }};")
    lines += ["", "# Channels the sHype policy permits (event channels and grants, both ways)"]
    comms: set[tuple[str, str]] = set()
    for i, a in enumerate(subs):
        for b in subs[i:]:
            if a.type == DOM0_TYPE and b.type == DOM0_TYPE:
                continue  # dom0 with itself: Xen's dom0.te (domain_comms(dom0_t, dom0_t))
            if not may_communicate(engine, a.label, b.label):
                continue
            pair = (a.type, b.type) if a.type <= b.type else (b.type, a.type)
            comms.add(pair)
            lines.append(f"domain_comms({a.type}, {b.type})")
            if a.type == b.type:
                lines.append(f"domain_self_comms({a.type})")
    dynamic = [s for s in guests if s.label is not None and _dynamic(policy, s.label)]
    if dynamic:
        lines += ["", "# Dynamic labels: an instance with itself (instances apart: see above)"]
    for s in dynamic:
        if (s.type, s.type) not in comms:
            lines.append(f"domain_self_comms({s.type})")
    lines.append("")
    return FlaskPolicy("\n".join(lines), subs, frozenset(comms))
