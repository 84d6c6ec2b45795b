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
import os
import re
import uuid as uuidlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from shyped.fileio.atomicfile import write_atomic
from shyped.fileio.boundedread import LABELS_MAX_BYTES, read_bounded


class LabelStoreError(Exception):
    """A label store file or a resource name that cannot be used."""


_NAME = re.compile(r"^[A-Za-z0-9_.-][A-Za-z0-9_.+-]{0,127}$")
#: ACM's mark for a resource label a policy update removed: ``INV_ACM:<old policy>:<label>``
#: (``tools/python/xen/util/xsm/acm/acm.py`` ``__update_label_policy_change``, Xen 4.1.0).
INVALID_PREFIX: Final = "INV_ACM:"
_INVALID = re.compile(r"^INV_ACM:[^:\s\x00-\x1f\x7f]{1,128}:[A-Za-z0-9_.-][A-Za-z0-9_.+-]{0,127}$")
#: A resource label assigned to one instance of a dynamic label: ``<label>@<uuid>``
#: (docs/policy.md, "Dynamic labels"; `shyped.core.instances.split_binding`).
_BOUND = re.compile(
    r"^[A-Za-z0-9_.-][A-Za-z0-9_.+-]{0,127}@"
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
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


#: Prefixes naming a disk's format or backend in front of its path: xl's deprecated
#: ``phy:``/``file:``/``tap:…`` forms, and the ``<format>:`` libxl writes as a qdisk backend's
#: ``params`` (libxl_disk.c: ``aio:``/``qcow:``/``qcow2:``/``vhd:``/``qed:``). Longest first.
_DISK_PREFIXES: Final = (
    "disk:",  # our own canonical form, so ids round-trip
    "tap2:aio:",
    "tap:qcow2:",
    "tap:qcow:",
    "tap:aio:",
    "tap:vhd:",
    "qcow2:",
    "qcow:",
    "file:",
    "phy:",
    "raw:",
    "aio:",
    "vhd:",
    "qed:",
)
_MAX_PATH: Final = 1024


def resource_id(spec: str) -> str:
    """Normalise a resource as operators write it, or as libxl records it, to the canonical id
    the daemon matches on (pure: no file system access; see `resolve_resource` for symlinks).

    `file:/a/b.img`, `phy:/dev/vg/x`, `tap:aio:/x`, libxl's qdisk ``aio:/x`` and a bare
    absolute path all name a disk by its absolute path: ``disk:`` + the path with every run
    of ``/`` collapsed to one (``//srv/x`` is ``/srv/x``, which `os.path.normpath` alone keeps
    as ``//srv/x``) and ``.`` components dropped. ``phy:NAME`` without a slash is
    ``/dev/NAME``, as ACM's ``unify_resname`` did. `bridge:xenbr0` names a bridge.

    Refused (so denied where a device uses them): a ``..`` component (resolving it by text is
    wrong after a symlink — ``/own/L/../x`` is not ``/own/x`` when ``L`` is a link — and the
    backend follows the kernel's reading), leading or trailing blanks and control characters
    (libxl keeps them: ``/img/a.img `` is another file than ``/img/a.img``).
    """
    s = spec
    if s.startswith("pci:"):
        return pci_resource(s[len("pci:") :])
    if s.startswith("bridge:"):
        name = s[len("bridge:") :]
        if not _NAME.fullmatch(name):
            raise LabelStoreError(f"invalid bridge name in resource {spec!r}")
        return "bridge:" + name
    for prefix in _DISK_PREFIXES:
        if s.startswith(prefix):
            s = s[len(prefix) :]
            if prefix == "phy:" and s and not s.startswith("/"):
                s = "/dev/" + s
            break
    if not s.startswith("/") or len(s) > _MAX_PATH:
        raise LabelStoreError(
            f"invalid resource {spec!r}: expected file:/path, phy:/dev/..., an absolute path, "
            "bridge:NAME or pci:SSSS:BB:DD.F"
        )
    if s != s.strip() or any(ord(c) < 0x20 or c == "\x7f" for c in s):
        raise LabelStoreError(f"invalid resource {spec!r}: blanks around it or control characters")
    if ".." in s.split("/"):
        raise LabelStoreError(
            f"invalid resource {spec!r}: a '..' component (write the path without it)"
        )
    return "disk:" + _collapse(s)


def _collapse(path: str) -> str:
    """An absolute path with one leading ``/``, runs of ``/`` collapsed and ``.`` dropped
    (both purely lexical and always right; ``..`` is refused before this)."""
    return "/" + "/".join(c for c in path.split("/") if c not in ("", "."))


def resolve_resource(rid: str) -> str:
    """The id of the file a disk resource id names *now*: ``disk:`` + ``realpath`` of its path
    (every symlink in the part of the path that exists followed, as the backend will follow
    them; a path that does not exist stays as `resource_id` normalised it). Bridges are
    returned unchanged. I/O: called by the daemon at decision and assignment time,
    never by the pure core (see docs/operations.md for what this does not close)."""
    if not rid.startswith("disk:"):
        return rid
    path = rid[len("disk:") :]
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):
        return rid
    if len(real) > _MAX_PATH:
        return rid
    return "disk:" + _collapse(real)


def canonical_resource(spec: str) -> str:
    """`resource_id` then `resolve_resource`: what the daemon matches on."""
    return resolve_resource(resource_id(spec))


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


#: Image formats whose header can name a backing file that qemu opens too: the image's label
#: would not cover what the backend reads, so a device using one is refused.
LAYERED_FORMATS: Final = ("qcow2:", "qcow:", "vhd:", "qed:", "tap:qcow2:", "tap:qcow:", "tap:vhd:")


def disk_resource(params: str) -> str:
    """The resource id of a vbd whose backend `params` is the given path; refused for image
    formats with backing files (`LAYERED_FORMATS`, as libxl writes a qdisk's params)."""
    if params.startswith(LAYERED_FORMATS):
        raise LabelStoreError(f"layered image format in {params[:200]!r}")
    return resource_id(params)


#: A PCI device as libxl prints it (libxl_pci.c ``PCI_BDF`` "%04x:%02x:%02x.%01x"): segment,
#: bus, device (0-1f), function (0-7), lower-case hex, nothing else.
_PCI_BDF: Final = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]")


def pci_resource(bdf: str) -> str:
    """The resource id ``pci:SSSS:BB:DD.F`` of a PCI device, from exactly that canonical form
    (what libxl writes and `flask-label-pci` takes). Every other spelling is refused rather
    than guessed: short forms without a segment, upper case, blanks, a device past 1f or a
    function past 7, a virtual slot (``@``) or options."""
    if not _PCI_BDF.fullmatch(bdf):
        raise LabelStoreError(
            f"invalid PCI device {bdf[:60]!r}: expected pci:SSSS:BB:DD.F in lower-case hex "
            "(segment, bus, device 00-1f, function 0-7), e.g. pci:0000:03:00.0"
        )
    return "pci:" + bdf


def bridge_resource(bridge: str) -> str:
    """The resource id of a vif attached to the given bridge."""
    return resource_id("bridge:" + bridge)


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

    Labels are bare names of the active policy, except resource labels a policy update
    removed: those are kept as ACM marked them, ``INV_ACM:<old policy>:<label>`` (see
    `after_update`), and deny every use until the resource is labelled again.
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
        one already invalid stays so. Domain assignments follow renames (`renamed`); those
        naming deleted labels stay as they are (they deny, as any unknown label). `dom0`
        is dom0's label in the new policy (None: the bootstrap label).
        """
        resources: dict[str, str] = {}
        for key, label in self.resources.items():
            if label.startswith(INVALID_PREFIX):
                resources[key] = label
            elif _split(label)[0] in resource:
                resources[key] = _rebind(label, resource)
            else:
                resources[key] = f"{INVALID_PREFIX}{old_policy}:{label}"
        renamed = self.renamed(vm, {})
        return attrs.evolve(renamed, resources=resources, dom0=dom0)

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
                or (path == ("resources",) and (_INVALID.fullmatch(v) or _BOUND.fullmatch(v)))
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


def overwrite_problem(path: Path, current: LabelStore) -> str | None:
    """Why replacing the store file at `path` with a change to `current` (the store in use)
    would lose something, or None: the file has errors (every one, at its line), or it holds
    other assignments than `current` (edited by hand since it was loaded). `addlabel` and
    `rmlabel` ask this first; a reload (SIGHUP) takes the file in, then they may write."""
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
            f"the label store {path} was changed since the daemon loaded it; reload (SIGHUP) "
            "to take the change in before changing labels, so that it is not overwritten"
        )
    return None


def save_label_store(store: LabelStore, path: Path) -> None:
    """Write the store atomically: readers see the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, store.to_json().encode(), mode=0o640)
