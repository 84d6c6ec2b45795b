"""Which label each domain and resource carries: the daemon-owned assignment store.

Xen ACM kept label assignments outside the policy (in the domain config and a resource label
file); so do we. Domains are keyed by UUID (preferred: names can be reused) or by name;
resources by a canonical resource id: `file:/path` / `phy:/dev/…` disk images (stored under
their absolute path, which is what libxl writes as the backend's `params`; `//` collapsed,
symlinks resolved where the file exists, see `resource_id` and `resolve_resource`) and
`bridge:NAME` for network bridges, `pci:SSSS:BB:DD.F` for PCI devices passed through (the form
`flask-label-pci` takes). The mapping is pure; `load_label_store` /
`save_label_store` and `resolve_resource` are the only I/O, and saving is atomic (temp file,
fsync, rename, fsync of the folder).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
import uuid as uuidlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from shyped.core.resourceids import _NAME
from shyped.core.resourceids import LAYERED_FORMATS as LAYERED_FORMATS
from shyped.core.resourceids import LabelStoreError as LabelStoreError
from shyped.core.resourceids import bridge_resource as bridge_resource
from shyped.core.resourceids import canonical_resource as canonical_resource
from shyped.core.resourceids import disk_resource as disk_resource
from shyped.core.resourceids import pci_resource as pci_resource
from shyped.core.resourceids import resolve_resource as resolve_resource
from shyped.core.resourceids import resource_id as resource_id
from shyped.fileio.atomicfile import write_atomic
from shyped.fileio.boundedread import LABELS_MAX_BYTES, read_bounded

#: ACM's mark for a resource label a policy update removed: ``INV_ACM:<old policy>:<label>``
#: (``tools/python/xen/util/xsm/acm/acm.py`` ``__update_label_policy_change``, Xen 4.1.0).
INVALID_PREFIX: Final = "INV_ACM:"
_INVALID = re.compile(r"^INV_ACM:[^:\s\x00-\x1f\x7f]{1,128}:[A-Za-z0-9_.-][A-Za-z0-9_.+-]{0,127}\Z")
#: A resource label assigned to one instance of a dynamic label: ``<label>@<uuid>``
#: (docs/policy.md, "Dynamic labels"; `shyped.core.instances.split_binding`).
_BOUND = re.compile(
    r"^[A-Za-z0-9_.-][A-Za-z0-9_.+-]{0,127}@"
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z"
)


def _split(label: str) -> tuple[str, str | None]:
    """``"<label>@<uuid>"`` -> (label, lower-case uuid); any other label -> (label, None)."""
    if _BOUND.fullmatch(label):
        name, _, uuid = label.partition("@")
        return name, uuid.lower()
    return label, None


def _rebind(label: str, rename: Mapping[str, str]) -> str:
    """`label` with its name renamed by `rename`, keeping an instance binding."""
    name, uuid = _split(label)
    name = rename.get(name, name)
    return name if uuid is None else f"{name}@{uuid}"


def resolved_store(store: LabelStore) -> LabelStore:
    """The store with every disk key resolved (`resolve_resource`); two keys naming one file
    with different labels are an error (the store would be ambiguous)."""
    resources: dict[str, str] = {}
    origin: dict[str, str] = {}
    for key, label in sorted(store.resources.items()):
        rid = resolve_resource(key)
        if rid in resources and resources[rid] != label:
            raise LabelStoreError(
                f"resources {origin[rid]!r} and {key!r} name the same file {rid[5:]!r} with "
                f"different labels ({resources[rid]!r}, {label!r})"
            )
        resources[rid] = label
        origin[rid] = key
    return attrs.evolve(store, resources=resources)


def _check_uuid(text: str) -> str:
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        raise LabelStoreError(f"invalid domain uuid {text!r}") from None


def _domain_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise LabelStoreError(f"invalid domain name {name!r}")
    return name


@attrs.frozen
class LabelStore:
    """Label assignments: domain uuid → label, domain name → label, resource id → label, and
    dom0's label when an operator relabelled it (None: the policy's bootstrap label).

    Labels are bare names of the active policy, except labels a policy update removed:
    those are kept as ACM marked them, ``INV_ACM:<old policy>:<label>`` (see
    `after_update`), and deny every use until the domain or resource is labelled again.
    """

    by_uuid: dict[str, str] = attrs.field(factory=dict)
    by_name: dict[str, str] = attrs.field(factory=dict)
    resources: dict[str, str] = attrs.field(factory=dict)
    dom0: str | None = None

    def domain_label(self, uuid: str | None, name: str | None) -> str | None:
        """The label assigned to a domain: by uuid first, then by name; None if unassigned."""
        if uuid is not None:
            label = self.by_uuid.get(uuid.lower())
            if label is not None:
                return label
        if name is not None:
            return self.by_name.get(name)
        return None

    def resource_label(self, rid: str) -> str | None:
        """A resource's label name (an instance binding, ``@<uuid>``, left out)."""
        label = self.resources.get(rid)
        return None if label is None else _split(label)[0]

    def resource_binding(self, rid: str) -> tuple[str | None, str | None]:
        """A resource's label name and the UUID of the instance it is assigned to (None:
        assigned to no instance)."""
        label = self.resources.get(rid)
        return (None, None) if label is None else _split(label)

    def with_domain(
        self, *, uuid: str | None = None, name: str | None = None, label: str | None
    ) -> LabelStore:
        """A copy with a domain's label set (or removed with label=None)."""
        by_uuid, by_name = dict(self.by_uuid), dict(self.by_name)
        if uuid is not None:
            key = _check_uuid(uuid)
            _assign(by_uuid, key, label)
        if name is not None:
            _assign(by_name, _domain_name(name), label)
        return attrs.evolve(self, by_uuid=by_uuid, by_name=by_name)

    def with_resource(self, spec: str, label: str | None) -> LabelStore:
        """A copy with a resource's label set (or removed with label=None)."""
        resources = dict(self.resources)
        _assign(resources, resource_id(spec), label, bound_ok=True)
        return attrs.evolve(self, resources=resources)

    def with_dom0(self, label: str | None) -> LabelStore:
        """A copy with dom0's label set (None: back to the policy's bootstrap label)."""
        if label is not None and not _NAME.fullmatch(label):
            raise LabelStoreError(f"invalid label name {label!r}")
        return attrs.evolve(self, dom0=label)

    def after_update(
        self,
        *,
        old_policy: str,
        vm: Mapping[str, str],
        resource: Mapping[str, str],
        dom0: str | None = None,
    ) -> LabelStore:
        """The store once a policy update is applied, as ACM's ``change_acm_policy`` left it.

        `vm` and `resource` map every label of the old policy that survives to its new name
        (``from=`` renames included; `shyped.policy.update.LabelMaps`). A resource label that
        survives takes its new name; one that does not becomes
        ``INV_ACM:<old_policy>:<label>`` (it then denies every use: relabel the resource);
        one already invalid stays so. Domain assignments are carried over the same way
        (a label of a later policy that reuses a deleted name must not take them over
        silently). `dom0` is dom0's label in the new policy (None: the bootstrap label).
        A resource bound to an instance (``<label>@<uuid>``) keeps its binding.
        """

        def carried(table: Mapping[str, str], names: Mapping[str, str]) -> dict[str, str]:
            out: dict[str, str] = {}
            for key, label in table.items():
                if label.startswith(INVALID_PREFIX):
                    out[key] = label
                elif _split(label)[0] in names:
                    out[key] = _rebind(label, names)
                else:
                    out[key] = f"{INVALID_PREFIX}{old_policy}:{label}"
            return out

        return attrs.evolve(
            self,
            by_uuid=carried(self.by_uuid, vm),
            by_name=carried(self.by_name, vm),
            resources=carried(self.resources, resource),
            dom0=dom0,
        )

    def invalidated(self) -> list[str]:
        """The assignments marked ``INV_ACM:…`` by a policy update (warnings, `shypectl`)."""
        return [
            f"{what} {key!r}: {label}"
            for what, table in (
                ("domain uuid", self.by_uuid),
                ("domain name", self.by_name),
                ("resource", self.resources),
            )
            for key, label in sorted(table.items())
            if label.startswith(INVALID_PREFIX)
        ]

    def renamed(self, vm: Mapping[str, str], resource: Mapping[str, str]) -> LabelStore:
        """A copy with the labels a policy update renames (``from=``; old -> new name) rewritten,
        as ACM rewrote assignments on rename. Labels the maps do not name stay as they are."""
        return attrs.evolve(
            self,
            by_uuid={k: vm.get(v, v) for k, v in self.by_uuid.items()},
            by_name={k: vm.get(v, v) for k, v in self.by_name.items()},
            resources={k: _rebind(v, resource) for k, v in self.resources.items()},
        )

    def to_json(self) -> str:
        doc: dict[str, object] = {
            "version": 1,
            "domains": {"uuid": self.by_uuid, "name": self.by_name},
            "resources": self.resources,
        }
        if self.dom0 is not None:
            doc["dom0"] = self.dom0
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def _assign(
    table: dict[str, str],
    key: str,
    label: str | None,
    *,
    invalid_ok: bool = False,
    bound_ok: bool = False,
) -> None:
    if label is None:
        table.pop(key, None)
    else:
        if not (
            _NAME.fullmatch(label)
            or (invalid_ok and _INVALID.fullmatch(label))
            or (bound_ok and _BOUND.fullmatch(label))
        ):
            raise LabelStoreError(f"invalid label name {label!r}")
        table[key] = label


# --------------------------------------------------------------------------- validation

_TOP_KEYS: Final = ("version", "domains", "resources", "dom0")
_DOMAIN_KEYS: Final = ("uuid", "name")
_WS: Final = re.compile(r"[ \t\n\r]*")


@attrs.frozen
class StoreProblem:
    """One thing wrong with a label store file, at its line (`error`: the store is refused;
    `warning`: it is used, but an assignment names a label the policy lacks)."""

    severity: str
    message: str
    file: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return (
            f"{where}: {self.message}"
            if self.severity == "error"
            else (f"{where}: warning: {self.message}")
        )


def _key_lines(
    text: str,
) -> tuple[dict[tuple[str, ...], int], list[tuple[tuple[str, ...], int, int]]]:
    """The line of every object key of (valid) JSON text by key path, and the keys defined
    twice in one object (path, first line, line) — `json` silently keeps the last."""
    lines: dict[tuple[str, ...], int] = {}
    dups: list[tuple[tuple[str, ...], int, int]] = []
    raw = json.JSONDecoder().raw_decode

    seen = [0, 1]  # position, line: keys come in text order, so counting is linear

    def line_at(i: int) -> int:
        seen[1] += text.count("\n", seen[0], i)
        seen[0] = i
        return seen[1]

    def ws(i: int) -> int:
        m = _WS.match(text, i)
        return m.end() if m else i

    def value(i: int, path: tuple[str, ...]) -> int:
        i = ws(i)
        if text.startswith("{", i):
            i = ws(i + 1)
            if text.startswith("}", i):
                return i + 1
            while True:
                i = ws(i)
                key, j = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
                here = (*path, key)
                line = line_at(i)
                if here in lines:
                    dups.append((here, lines[here], line))
                else:
                    lines[here] = line
                i = ws(value(ws(j) + 1, here))
                if not text.startswith(",", i):
                    return i + 1
                i += 1
        if text.startswith("[", i):
            i, n = ws(i + 1), 0
            if text.startswith("]", i):
                return i + 1
            while True:
                i = ws(value(i, (*path, str(n))))
                n += 1
                if not text.startswith(",", i):
                    return i + 1
                i += 1
        return int(raw(text, i)[1])

    # On failure lines stay unknown; json.loads has judged the text already.
    with contextlib.suppress(RecursionError, ValueError, IndexError):
        value(0, ())
    return lines, dups


def _hint(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def label_store_problems(text: str, where: str, policy: Any = None) -> list[StoreProblem]:
    """Every problem of a label store's text, each at its line: JSON syntax, unknown keys
    (with "did you mean"), keys defined twice, values that are not strings, bad domain uuids
    and names, bad resource ids, label names that cannot be labels, two keys naming one
    domain or resource with different labels (errors); with a `policy`
    (`shyped.policy.model.Policy`), labels it lacks (warnings: the daemon denies such a
    domain or resource with rule ``label``)."""
    return _check_store(text, where, policy)[0]


def _check_store(text: str, where: str, policy: Any) -> tuple[list[StoreProblem], LabelStore]:
    """The problems and the store the text makes (meaningful only without errors). One pass:
    lines are looked up (`_key_lines`) only when there is something to report."""
    found: list[tuple[str, tuple[str, ...], str]] = []  # message, key path, severity

    def bad(message: str, path: tuple[str, ...], severity: str = "error") -> None:
        found.append((message, path, severity))

    twice = [False]

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(items)
        if len(obj) != len(items):
            twice[0] = True
        return obj

    try:
        doc = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        msg = f"not valid JSON: {exc.msg} (column {exc.colno})"
        return [StoreProblem("error", msg, where, exc.lineno)], LabelStore()
    except RecursionError:
        return [StoreProblem("error", "JSON nested too deeply", where)], LabelStore()
    by_uuid: dict[str, str] = {}
    by_name: dict[str, str] = {}
    resources: dict[str, str] = {}
    if not isinstance(doc, dict):
        bad('expected an object with "version": 1', ())
        doc = {"version": 1}
    if doc.get("version") != 1:
        bad('expected "version": 1', ("version",))
    for key in doc:
        if key not in _TOP_KEYS:
            bad(f"unknown key {key!r}{_hint(key, _TOP_KEYS)}", (key,))
    domains = doc.get("domains", {})
    if not isinstance(domains, dict):
        bad('"domains" must be an object', ("domains",))
        domains = {}
    for key in domains:
        if key not in _DOMAIN_KEYS:
            bad(f"unknown key 'domains.{key}'{_hint(key, _DOMAIN_KEYS)}", ("domains", key))

    def entries(value: Any, *path: str) -> list[tuple[str, str, tuple[str, ...]]]:
        if not isinstance(value, dict):
            bad(f"{'.'.join(path)} must be an object of strings", path)
            return []
        out = []
        for k, v in value.items():
            at = (*path, k)
            if not isinstance(v, str):
                bad(f"{'.'.join(path)}.{k}: the label must be a string, not {v!r:.40}", at)
            elif not (
                _NAME.fullmatch(v)
                or _INVALID.fullmatch(v)
                or (path == ("resources",) and _BOUND.fullmatch(v))
            ):
                bad(f"{'.'.join(path)}.{k}: invalid label name {v!r}", at)
            else:
                out.append((k, v, at))
        return out

    vm_ok = set() if policy is None else {v.name for v in policy.vm_labels}
    res_ok = set() if policy is None else {r.name for r in policy.resource_labels}

    def lacks(what: str, k: str, label: str, known: set[str], at: tuple[str, ...]) -> None:
        label = _split(label)[0]
        if policy is not None and label not in known and not _INVALID.fullmatch(label):
            kind = "VM" if what == "domain" else "resource"
            msg = f"{what} {k}: policy {policy.name!r} has no {kind} label {label!r}"
            bad(msg + _hint(label, known), at, "warning")

    for table, canonical, what, known, path in (
        (by_uuid, _check_uuid, "domain", vm_ok, ("domains", "uuid")),
        (by_name, _domain_name, "domain", vm_ok, ("domains", "name")),
        (resources, resource_id, "resource", res_ok, ("resources",)),
    ):
        holder = domains if path[0] == "domains" else doc
        origin: dict[str, str] = {}
        for k, label, at in entries(holder.get(path[-1], {}), *path):
            try:
                key = canonical(k)
            except LabelStoreError as exc:
                bad(str(exc), at)
                continue
            if key in table and table[key] != label:
                bad(f"{k!r} and {origin[key]!r} name the same thing with different labels", at)
            table[key] = label
            origin.setdefault(key, k)
            lacks(what, k, label, known, at)
            res = (
                policy.resource_label(label) if policy is not None and what == "resource" else None
            )
            if res is not None and res.per_instance:  # bare: no "@<uuid>"
                msg = (
                    f"resource {k}: label {label!r} is per instance: assign it to one instance "
                    f"as {label}@<uuid> (as it is, no domain may use it)"
                )
                bad(msg, at, "warning")
    dom0 = doc.get("dom0")
    if dom0 is not None and (not isinstance(dom0, str) or not _NAME.fullmatch(dom0)):
        bad(f"invalid dom0 label {str(dom0)[:80]!r}", ("dom0",))
        dom0 = None
    elif dom0 is not None:
        lacks("domain", "dom0", dom0, vm_ok, ("dom0",))
    store = LabelStore(by_uuid=by_uuid, by_name=by_name, resources=resources, dom0=dom0)
    if not found and not twice[0]:
        return [], store
    lines, dups = _key_lines(text)
    problems = [
        StoreProblem(
            "error",
            f"{'.'.join(path)!r} is defined twice (first at line {first}); "
            "JSON would keep only the last",
            where,
            line,
        )
        for path, first, line in dups
    ]
    problems += [StoreProblem(sev, msg, where, lines.get(path, 1)) for msg, path, sev in found]
    return sorted(problems, key=lambda p: p.line or 0), store


def parse_label_store(text: str, where: str = "<labels>") -> LabelStore:
    """Parse the JSON store; every entry is validated so a bad file is refused whole, with
    every problem at its line (`label_store_problems`)."""
    problems, store = _check_store(text, where, None)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise LabelStoreError("\n".join(str(p) for p in errors))
    return store


def load_label_store(path: Path) -> LabelStore:
    """Read the store; a missing file is an empty store, an unreadable or bad one an error.

    At most `LABELS_MAX_BYTES` of a regular file are read (``/dev/zero`` is refused at once).
    """
    try:
        text = read_bounded(path, LABELS_MAX_BYTES, "label store").decode("utf-8")
    except FileNotFoundError:
        return LabelStore()
    except OSError as exc:
        raise LabelStoreError(f"{path}: cannot read label store: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise LabelStoreError(f"{path}: cannot read label store: not UTF-8: {exc}") from None
    store = parse_label_store(text, str(path))
    try:
        return resolved_store(store)
    except LabelStoreError as exc:
        raise LabelStoreError(f"{path}: {exc}") from None


#: What `overwrite_problem` tells an operator to do first (a single host's file is its store).
RELOAD_FIRST: Final = "reload (SIGHUP) to take the change in before changing labels"


def overwrite_problem(path: Path, current: LabelStore, remedy: str = RELOAD_FIRST) -> str | None:
    """Why replacing the store file at `path` with a change to `current` (the store in use)
    would lose something, or None: the file has errors (every one, at its line), or it holds
    other assignments than `current` (edited by hand since it was loaded). `addlabel` and
    `rmlabel` ask this first; a reload (SIGHUP) takes the file in, then they may write
    (`remedy` says what to do instead where a reload does not: pool mode)."""
    try:
        text = read_bounded(path, LABELS_MAX_BYTES, "label store").decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return None  # the write reports what is wrong with the path
    errors = [p for p in label_store_problems(text, str(path)) if p.severity == "error"]
    if errors:
        return (
            f"the label store {path} has errors; fix them and reload (SIGHUP) before changing "
            "labels, so that the edit is not overwritten:\n" + "\n".join(map(str, errors))
        )
    try:
        on_disk = resolved_store(parse_label_store(text, str(path)))
    except LabelStoreError as exc:
        return f"the label store {path} cannot be used: {exc}"
    if on_disk != current:
        return (
            f"the label store {path} was changed since the daemon loaded it; {remedy}, so "
            "that the change is not overwritten"
        )
    return None


def save_label_store(store: LabelStore, path: Path) -> None:
    """Write the store atomically: readers see the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, store.to_json().encode(), mode=0o640)
