"""The sHype / Xen ACM policy model: immutable, validated as a whole at construction.

A `Policy` is built in one step from its parts and checks itself in its constructor
(`__attrs_post_init__`): if anything is wrong, a `PolicyError` listing every problem is raised
and no policy object exists. Loaders (TOML, Xen ACM XML) only translate their format into
these classes and map `Problem.path` back to source lines.

Vocabulary (DESIGN.md §3):
- STE types: two subjects may communicate (event channel, grant, vchan) only if their labels
  share an STE type; a domain may use a resource only if its label holds the resource's type.
- Chinese Wall (CW) types and named conflict sets: once a domain whose label carries a type of a
  set runs, domains carrying the *other* types of that set may not start.
- MLS: optional sensitivity level (totally ordered, declared low to high) plus a set of
  categories on a label; see `shyped.policy.mls` for the rule per hook.
- VM (subject) labels and resource (object) labels live in separate namespaces, as in ACM
  (its default policy has a VM label and a resource label both named ``SystemManagement``).
- The bootstrap label is the VM label dom0 runs with.
- Labels are written ``ACM:<policy>:<label>`` (`LabelRef`), as the Xen 3.x ACM tools did
  (``tools/python/xen/util/xsm/acm/acm.py`` splits on ``:`` into exactly three parts and
  requires the first to be ``ACM``); hence no ``:`` in policy or label names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

import attrs

from shyped.policy.errors import LabelSyntaxError, PathPart, PolicyError, Problem

#: Policy type prefix of a label string (``xsconstants.ACM_POLICY_ID`` in Xen 3.4).
ACM_POLICY_ID: Final = "ACM"

#: Longest name accepted for a policy, type, set, label, level or category.
MAX_NAME_LEN: Final = 128

# Printable, no whitespace, no ':' (the label string separator). Dots, dashes, underscores,
# parentheses (ACM's examples use ``res_HardDrive(hda)``) and the like are fine.
_NAME_RE: Final = re.compile(r"[^\s:\x00-\x1f\x7f]+")
_VERSION_RE: Final = re.compile(r"([0-9]{1,8})\.([0-9]{1,8})")


def name_problem(name: object, what: str) -> str | None:
    """Why `name` is not a valid name for `what`, or None if it is."""
    if not isinstance(name, str):
        return f"{what} must be a string, not {type(name).__name__}"
    if not name:
        return f"{what} must not be empty"
    if len(name) > MAX_NAME_LEN:
        return f"{what} {name[:40]!r}... is longer than {MAX_NAME_LEN} characters"
    if ":" in name:
        return f"{what} {name!r} contains ':' (reserved as the label string separator)"
    if not _NAME_RE.fullmatch(name):
        return f"{what} {name!r} contains whitespace or control characters"
    return None


def _fs(items: Iterable[str]) -> frozenset[str]:
    return frozenset(items)


def _strs(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(items)


def _sets(items: Iterable[ConflictSet]) -> tuple[ConflictSet, ...]:
    return tuple(items)


def _vms(items: Iterable[VmLabel]) -> tuple[VmLabel, ...]:
    return tuple(items)


def _ress(items: Iterable[ResourceLabel]) -> tuple[ResourceLabel, ...]:
    return tuple(items)


# --------------------------------------------------------------------------- label strings


@attrs.frozen(order=True)
class LabelRef:
    """A label as written on a domain or resource: ``ACM:<policy>:<label>``.

    It names a label of a policy by name; whether that label exists is for the engine to say.
    """

    policy: str
    label: str

    @classmethod
    def parse(cls, text: str) -> LabelRef:
        """Parse ``ACM:<policy>:<label>``; raise `LabelSyntaxError` saying what is wrong."""
        parts = text.split(":")
        if len(parts) != 3:
            raise LabelSyntaxError(
                f"label {text[:80]!r} is not of the form {ACM_POLICY_ID}:<policy>:<label>"
            )
        kind, policy, label = parts
        if kind != ACM_POLICY_ID:
            raise LabelSyntaxError(
                f"label {text[:80]!r} has policy type {kind[:20]!r}, expected {ACM_POLICY_ID!r}"
            )
        for value, what in ((policy, "policy name"), (label, "label name")):
            why = name_problem(value, what)
            if why is not None:
                raise LabelSyntaxError(f"label {text[:80]!r}: {why}")
        return cls(policy, label)

    def __str__(self) -> str:
        return f"{ACM_POLICY_ID}:{self.policy}:{self.label}"


# --------------------------------------------------------------------------- header


@attrs.frozen(order=True)
class PolicyVersion:
    """``major.minor`` as in ACM's ``VersionFormat``; an update must raise it."""

    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> PolicyVersion:
        """Parse ``"1.0"``; raise ValueError otherwise."""
        m = _VERSION_RE.fullmatch(text) if isinstance(text, str) else None
        if m is None:
            raise ValueError(f"version {text!r} is not of the form <major>.<minor> (e.g. '1.0')")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


@attrs.frozen
class PolicyRef:
    """A policy's name and version: the header's ``FromPolicy`` (the policy this one updates)."""

    name: str
    version: PolicyVersion

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


# --------------------------------------------------------------------------- parts


@attrs.frozen
class ConflictSet:
    """A named Chinese Wall conflict set: its types exclude each other on one host."""

    name: str
    types: frozenset[str] = attrs.field(converter=_fs)


@attrs.frozen
class MlsLabel:
    """An MLS sensitivity label: a level (declared in the policy, low to high) and categories."""

    level: str
    categories: frozenset[str] = attrs.field(converter=_fs, factory=frozenset)

    def __str__(self) -> str:
        if not self.categories:
            return self.level
        return f"{self.level}{{{','.join(sorted(self.categories))}}}"


#: Quota field names, in display order (all optional non-negative ints).
QUOTA_FIELDS: Final = (
    "max_domains",
    "max_memory_mib",
    "max_vcpus",
    "max_devices",
    "max_vchans",
    "max_event_channels",
    "max_grant_refs",
    "max_label_memory_mib",
    "max_cpu_percent",
)


@attrs.frozen
class Quota:
    """Per-label resource limits (None: unlimited). Validated now; enforced by a later issue.

    `max_domains` counts running domains with the label; the next six are per domain;
    `max_label_memory_mib` (memory the label's running domains hold, as Xen measures it) and
    `max_cpu_percent` (their CPU over a window, 100 = one physical CPU) are run-time quotas,
    judged on the hypervisor's metering (`shyped.core.quota.RuntimeQuotas`).
    """

    max_domains: int | None = None
    max_memory_mib: int | None = None
    max_vcpus: int | None = None
    max_devices: int | None = None
    max_vchans: int | None = None
    max_event_channels: int | None = None
    max_grant_refs: int | None = None
    max_label_memory_mib: int | None = None
    max_cpu_percent: int | None = None

    @property
    def is_unlimited(self) -> bool:
        return all(getattr(self, f) is None for f in QUOTA_FIELDS)


@attrs.frozen
class VmLabel:
    """A subject label for domains.

    `from_name` is the label's name in the policy this one updates (ACM's ``from=``), used by
    the update check to follow renames.

    `dynamic` marks a template (docs/policy.md, "Dynamic labels"): every domain started with it
    runs as its own instance (``<label>#<id>``, derived from its UUID by
    `shyped.core.instances`). Two instances may talk only through a type of `shared_types` (a
    subset of `ste_types`): every other type of a dynamic label is private to each instance.
    Domains of static labels see an instance as its template.
    """

    name: str
    ste_types: frozenset[str] = attrs.field(converter=_fs, factory=frozenset)
    cw_types: frozenset[str] = attrs.field(converter=_fs, factory=frozenset)
    mls: MlsLabel | None = None
    quota: Quota = attrs.field(factory=Quota)
    from_name: str | None = None
    dynamic: bool = False
    shared_types: frozenset[str] = attrs.field(converter=_fs, factory=frozenset)

    @property
    def private_types(self) -> frozenset[str]:
        """The types each instance holds alone (all of them for a static label: none)."""
        return self.ste_types - self.shared_types if self.dynamic else frozenset()


@attrs.frozen
class ResourceLabel:
    """An object label for resources (disk images, bridges ...): one STE type, as in ACM.

    `per_instance`: a resource with this label belongs to one instance of a dynamic label
    (its own disk image): the label store assigns it as ``<label>@<uuid>`` and only the
    instance of that domain may use it (`shyped.policy.instances`).
    """

    name: str
    ste_type: str
    mls: MlsLabel | None = None
    from_name: str | None = None
    per_instance: bool = False

    @property
    def ste_types(self) -> frozenset[str]:
        return frozenset((self.ste_type,))


@attrs.frozen
class Defaults:
    """What unlabelled subjects and resources get: None means deny, else a label name."""

    unlabelled_domain: str | None = None
    unlabelled_resource: str | None = None


# --------------------------------------------------------------------------- the policy


@attrs.frozen(order=False)
class Policy:
    """A complete, validated policy. Construction raises `PolicyError` on any problem.

    Order of the tuples is the declaration order (kept for export and stable reports);
    decisions never depend on it.
    """

    name: str
    version: PolicyVersion
    bootstrap: str
    ste_types: tuple[str, ...] = attrs.field(converter=_strs, default=())
    cw_types: tuple[str, ...] = attrs.field(converter=_strs, default=())
    conflict_sets: tuple[ConflictSet, ...] = attrs.field(converter=_sets, default=())
    vm_labels: tuple[VmLabel, ...] = attrs.field(converter=_vms, default=())
    resource_labels: tuple[ResourceLabel, ...] = attrs.field(converter=_ress, default=())
    mls_levels: tuple[str, ...] = attrs.field(converter=_strs, default=())
    mls_categories: tuple[str, ...] = attrs.field(converter=_strs, default=())
    defaults: Defaults = attrs.field(factory=Defaults)
    from_policy: PolicyRef | None = None

    # Derived lookup tables, filled after validation.
    _vm: Mapping[str, VmLabel] = attrs.field(
        init=False, repr=False, eq=False, hash=False, factory=dict
    )
    _res: Mapping[str, ResourceLabel] = attrs.field(
        init=False, repr=False, eq=False, hash=False, factory=dict
    )
    _level_rank: Mapping[str, int] = attrs.field(
        init=False, repr=False, eq=False, hash=False, factory=dict
    )
    _sets_of_type: Mapping[str, tuple[ConflictSet, ...]] = attrs.field(
        init=False, repr=False, eq=False, hash=False, factory=dict
    )

    def __attrs_post_init__(self) -> None:
        problems = _validate(self)
        if problems:
            raise PolicyError(problems)
        object.__setattr__(self, "_vm", {lab.name: lab for lab in self.vm_labels})
        object.__setattr__(self, "_res", {lab.name: lab for lab in self.resource_labels})
        object.__setattr__(self, "_level_rank", {lv: i for i, lv in enumerate(self.mls_levels)})
        sets_of: dict[str, list[ConflictSet]] = {t: [] for t in self.cw_types}
        for cs in self.conflict_sets:
            for t in cs.types:
                sets_of[t].append(cs)
        object.__setattr__(self, "_sets_of_type", {t: tuple(v) for t, v in sets_of.items()})

    # ---- lookups (O(1))

    @property
    def ref(self) -> PolicyRef:
        """This policy's name and version."""
        return PolicyRef(self.name, self.version)

    def vm_label(self, name: str) -> VmLabel | None:
        """The VM label called `name`, or None."""
        return self._vm.get(name)

    def resource_label(self, name: str) -> ResourceLabel | None:
        """The resource label called `name`, or None."""
        return self._res.get(name)

    @property
    def bootstrap_label(self) -> VmLabel:
        """dom0's label."""
        return self._vm[self.bootstrap]

    def level_rank(self, level: str) -> int:
        """Position of an MLS level, 0 = lowest. KeyError if unknown."""
        return self._level_rank[level]

    def conflict_sets_of(self, cw_type: str) -> tuple[ConflictSet, ...]:
        """The conflict sets containing `cw_type` (empty if none or unknown)."""
        return self._sets_of_type.get(cw_type, ())

    def label_string(self, label: str) -> str:
        """``ACM:<this policy>:<label>``."""
        return str(LabelRef(self.name, label))


# --------------------------------------------------------------------------- validation


def _validate(p: Policy) -> list[Problem]:
    """Every problem with `p`, each with a model path (see `errors.Problem`)."""
    out: list[Problem] = []

    def bad(message: str, *path: PathPart) -> None:
        out.append(Problem(message, tuple(path)))

    def check_name(name: object, what: str, *path: PathPart) -> bool:
        why = name_problem(name, what)
        if why is not None:
            bad(why, *path)
            return False
        return True

    def declared(names: tuple[str, ...], what: str, field: str) -> set[str]:
        seen: set[str] = set()
        for i, n in enumerate(names):
            if not check_name(n, what, field, i):
                continue
            if n in seen:
                bad(f"duplicate {what} {n!r}", field, i)
            seen.add(n)
        return seen

    # header
    check_name(p.name, "policy name", "name")
    if not isinstance(p.version, PolicyVersion):
        bad("version must be a PolicyVersion", "version")
    if p.from_policy is not None:
        check_name(p.from_policy.name, "from-policy name", "from_policy", "name")

    ste = declared(p.ste_types, "STE type", "ste_types")
    cw = declared(p.cw_types, "Chinese Wall type", "cw_types")
    levels = declared(p.mls_levels, "MLS level", "mls_levels")
    cats = declared(p.mls_categories, "MLS category", "mls_categories")

    # conflict sets
    set_names: set[str] = set()
    for i, cs in enumerate(p.conflict_sets):
        if check_name(cs.name, "conflict set name", "conflict_sets", i, "name"):
            if cs.name in set_names:
                bad(f"duplicate conflict set {cs.name!r}", "conflict_sets", i, "name")
            set_names.add(cs.name)
        for t in sorted(cs.types):
            if t not in cw:
                bad(
                    f"conflict set {cs.name!r} names unknown Chinese Wall type {t!r}",
                    "conflict_sets",
                    i,
                    "types",
                    t,
                )
        if len(cs.types) < 2:
            bad(
                f"conflict set {cs.name!r} needs at least two types to mean anything",
                "conflict_sets",
                i,
                "types",
            )

    def check_mls(mls: MlsLabel | None, owner: str, *path: PathPart) -> None:
        if mls is None:
            return
        if mls.level not in levels:
            known = ", ".join(p.mls_levels) or "none declared"
            bad(f"{owner} has unknown MLS level {mls.level!r} (levels: {known})", *path, "level")
        for c in sorted(mls.categories):
            if c not in cats:
                bad(f"{owner} has unknown MLS category {c!r}", *path, "categories", c)

    # VM labels
    vm_names: set[str] = set()
    vm_from: dict[str, str] = {}
    for i, lab in enumerate(p.vm_labels):
        if check_name(lab.name, "VM label name", "vm_labels", i, "name"):
            if lab.name in vm_names:
                bad(f"duplicate VM label {lab.name!r}", "vm_labels", i, "name")
            vm_names.add(lab.name)
        owner = f"VM label {lab.name!r}"
        for t in sorted(lab.ste_types):
            if t not in ste:
                bad(f"{owner} names unknown STE type {t!r}", "vm_labels", i, "ste_types", t)
        for t in sorted(lab.cw_types):
            if t not in cw:
                bad(f"{owner} names unknown Chinese Wall type {t!r}", "vm_labels", i, "cw_types", t)
        for cs in p.conflict_sets:
            own = sorted(cs.types & lab.cw_types)
            if len(own) >= 2:
                bad(
                    f"{owner} has Chinese Wall types {', '.join(map(repr, own))} that conflict "
                    f"with each other in conflict set {cs.name!r}",
                    "vm_labels",
                    i,
                    "cw_types",
                    own[1],
                )
        check_mls(lab.mls, owner, "vm_labels", i, "mls")
        if not isinstance(lab.dynamic, bool):
            bad(f"{owner}: dynamic must be true or false", "vm_labels", i, "dynamic")
        for t in sorted(lab.shared_types - lab.ste_types):
            bad(
                f"{owner} shares STE type {t!r} it does not hold (shared types are a subset "
                "of its STE types)",
                "vm_labels",
                i,
                "shared_types",
                t,
            )
        if lab.shared_types and not lab.dynamic:
            bad(
                f"{owner} lists shared types but is not dynamic (shared types say what the "
                "instances of a dynamic label have in common)",
                "vm_labels",
                i,
                "shared_types",
            )
        if lab.dynamic and lab.name == p.bootstrap:
            bad(
                f"{owner} is the bootstrap label and cannot be dynamic (dom0 is not an instance)",
                "vm_labels",
                i,
                "dynamic",
            )
        for f in QUOTA_FIELDS:
            v = getattr(lab.quota, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                bad(
                    f"{owner} quota {f} must be a non-negative integer, not {v!r}",
                    "vm_labels",
                    i,
                    "quota",
                    f,
                )
        if lab.from_name is not None and check_name(
            lab.from_name, "from name", "vm_labels", i, "from_name"
        ):
            if lab.from_name in vm_from:
                bad(
                    f"VM labels {vm_from[lab.from_name]!r} and {lab.name!r} both rename "
                    f"{lab.from_name!r}",
                    "vm_labels",
                    i,
                    "from_name",
                )
            vm_from[lab.from_name] = lab.name

    # resource labels
    res_names: set[str] = set()
    res_from: dict[str, str] = {}
    for i, r in enumerate(p.resource_labels):
        if check_name(r.name, "resource label name", "resource_labels", i, "name"):
            if r.name in res_names:
                bad(f"duplicate resource label {r.name!r}", "resource_labels", i, "name")
            res_names.add(r.name)
        owner = f"resource label {r.name!r}"
        if r.ste_type not in ste:
            bad(f"{owner} names unknown STE type {r.ste_type!r}", "resource_labels", i, "ste_type")
        check_mls(r.mls, owner, "resource_labels", i, "mls")
        if r.from_name is not None and check_name(
            r.from_name, "from name", "resource_labels", i, "from_name"
        ):
            if r.from_name in res_from:
                bad(
                    f"resource labels {res_from[r.from_name]!r} and {r.name!r} both rename "
                    f"{r.from_name!r}",
                    "resource_labels",
                    i,
                    "from_name",
                )
            res_from[r.from_name] = r.name

    # bootstrap and defaults
    if not p.bootstrap:
        bad("bootstrap label (dom0's label) is missing", "bootstrap")
    elif p.bootstrap not in vm_names:
        bad(f"bootstrap label {p.bootstrap!r} is not a VM label of the policy", "bootstrap")
    d = p.defaults
    if d.unlabelled_domain is not None and d.unlabelled_domain not in vm_names:
        bad(
            f"default for unlabelled domains names unknown VM label {d.unlabelled_domain!r}",
            "defaults",
            "unlabelled_domain",
        )
    if d.unlabelled_resource is not None and d.unlabelled_resource not in res_names:
        bad(
            f"default for unlabelled resources names unknown resource label "
            f"{d.unlabelled_resource!r}",
            "defaults",
            "unlabelled_resource",
        )
    return out
