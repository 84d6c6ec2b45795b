"""Which label each domain and resource carries: the daemon-owned assignment store.

Xen ACM kept label assignments outside the policy (in the domain config and a resource label
file); so do we. Domains are keyed by UUID (preferred: names can be reused) or by name;
resources by a canonical resource id: `file:/path` / `phy:/dev/…` disk images (stored under
their absolute path, which is what libxl writes as the backend's `params`; `//` collapsed,
symlinks resolved where the file exists, see `resource_id` and `resolve_resource`) and
`bridge:NAME` for network bridges. The mapping is pure; `load_label_store` /
`save_label_store` and `resolve_resource` are the only I/O, and saving is atomic (temp file,
fsync, rename, fsync of the folder).
"""

from __future__ import annotations

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
    if s.startswith("bridge:"):
        name = s[len("bridge:") :]
        if not _NAME.match(name):
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
            f"invalid resource {spec!r}: expected file:/path, phy:/dev/..., an absolute path "
            "or bridge:NAME"
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


def bridge_resource(bridge: str) -> str:
    """The resource id of a vif attached to the given bridge."""
    return resource_id("bridge:" + bridge)


def _check_uuid(text: str) -> str:
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        raise LabelStoreError(f"invalid domain uuid {text!r}") from None


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
        return self.resources.get(rid)

    def with_domain(
        self, *, uuid: str | None = None, name: str | None = None, label: str | None
    ) -> LabelStore:
        """A copy with a domain's label set (or removed with label=None)."""
        by_uuid, by_name = dict(self.by_uuid), dict(self.by_name)
        if uuid is not None:
            key = _check_uuid(uuid)
            _assign(by_uuid, key, label)
        if name is not None:
            if not _NAME.match(name):
                raise LabelStoreError(f"invalid domain name {name!r}")
            _assign(by_name, name, label)
        return attrs.evolve(self, by_uuid=by_uuid, by_name=by_name)

    def with_resource(self, spec: str, label: str | None) -> LabelStore:
        """A copy with a resource's label set (or removed with label=None)."""
        resources = dict(self.resources)
        _assign(resources, resource_id(spec), label)
        return attrs.evolve(self, resources=resources)

    def with_dom0(self, label: str | None) -> LabelStore:
        """A copy with dom0's label set (None: back to the policy's bootstrap label)."""
        if label is not None and not _NAME.match(label):
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
            elif label in resource:
                resources[key] = resource[label]
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
            resources={k: resource.get(v, v) for k, v in self.resources.items()},
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
    table: dict[str, str], key: str, label: str | None, *, invalid_ok: bool = False
) -> None:
    if label is None:
        table.pop(key, None)
    else:
        if not (_NAME.match(label) or (invalid_ok and _INVALID.match(label))):
            raise LabelStoreError(f"invalid label name {label!r}")
        table[key] = label


def _str_map(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise LabelStoreError(f"{what} must be an object of strings")
    return dict(value)


def parse_label_store(text: str, where: str = "<labels>") -> LabelStore:
    """Parse the JSON store; every entry is validated so a bad file is refused whole."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LabelStoreError(f"{where}: not valid JSON: {exc}") from None
    except RecursionError:
        raise LabelStoreError(f"{where}: JSON nested too deeply") from None
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise LabelStoreError(f'{where}: expected an object with "version": 1')
    domains = doc.get("domains", {})
    if not isinstance(domains, dict):
        raise LabelStoreError(f'{where}: "domains" must be an object')
    # Filled in place (linear: one `with_*` copy per entry would be quadratic in the file),
    # with the checks `with_domain` / `with_resource` make.
    by_uuid: dict[str, str] = {}
    by_name: dict[str, str] = {}
    resources: dict[str, str] = {}
    try:
        for key, label in _str_map(domains.get("uuid", {}), "domains.uuid").items():
            _assign(by_uuid, _check_uuid(key), label)
        for key, label in _str_map(domains.get("name", {}), "domains.name").items():
            if not _NAME.match(key):
                raise LabelStoreError(f"invalid domain name {key!r}")
            _assign(by_name, key, label)
        for key, label in _str_map(doc.get("resources", {}), "resources").items():
            _assign(resources, resource_id(key), label, invalid_ok=True)
        dom0 = doc.get("dom0")
        if dom0 is not None and (not isinstance(dom0, str) or not _NAME.match(dom0)):
            raise LabelStoreError(f"invalid dom0 label {str(dom0)[:80]!r}")
    except LabelStoreError as exc:
        raise LabelStoreError(f"{where}: {exc}") from None
    return LabelStore(by_uuid=by_uuid, by_name=by_name, resources=resources, dom0=dom0)


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


def save_label_store(store: LabelStore, path: Path) -> None:
    """Write the store atomically: readers see the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, store.to_json().encode(), mode=0o640)
