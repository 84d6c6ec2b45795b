"""Which label each domain and resource carries: the daemon-owned assignment store.

Xen ACM kept label assignments outside the policy (in the domain config and a resource label
file); so do we. Domains are keyed by UUID (preferred: names can be reused) or by name;
resources by a normalised resource id: `file:/path` / `phy:/dev/…` disk images (stored under
their absolute path, which is what libxl writes as the backend's `params`) and `bridge:NAME`
for network bridges. The mapping is pure; `load_label_store` / `save_label_store` are the only
I/O, and saving is atomic (temp file, fsync, rename, fsync of the folder).
"""

from __future__ import annotations

import json
import os
import re
import uuid as uuidlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from shyped.atomicfile import write_atomic


class LabelStoreError(Exception):
    """A label store file or a resource name that cannot be used."""


_NAME = re.compile(r"^[A-Za-z0-9_.-][A-Za-z0-9_.+-]{0,127}$")


def resource_id(spec: str) -> str:
    """Normalise a resource as operators write it to the id the daemon matches on.

    `file:/a/b.img`, `phy:/dev/vg/x`, `tap:aio:/x` and a bare absolute path all name a disk by
    its absolute path (libxl's backend `params`); `bridge:xenbr0` names a bridge.
    """
    s = spec.strip()
    if s.startswith("bridge:"):
        name = s[len("bridge:") :]
        if not _NAME.match(name):
            raise LabelStoreError(f"invalid bridge name in resource {spec!r}")
        return "bridge:" + name
    for prefix in ("file:", "phy:", "tap:aio:", "tap:qcow2:", "tap2:aio:"):
        if s.startswith(prefix):
            s = s[len(prefix) :]
            break
    if not s.startswith("/") or "\x00" in s or len(s) > 1024:
        raise LabelStoreError(
            f"invalid resource {spec!r}: expected file:/path, phy:/dev/..., an absolute path "
            "or bridge:NAME"
        )
    return "disk:" + os.path.normpath(s)


def disk_resource(params: str) -> str:
    """The resource id of a vbd whose backend `params` is the given path."""
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
    """Label assignments: domain uuid → label, domain name → label, resource id → label."""

    by_uuid: dict[str, str] = attrs.field(factory=dict)
    by_name: dict[str, str] = attrs.field(factory=dict)
    resources: dict[str, str] = attrs.field(factory=dict)

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
        doc = {
            "version": 1,
            "domains": {"uuid": self.by_uuid, "name": self.by_name},
            "resources": self.resources,
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def _assign(table: dict[str, str], key: str, label: str | None) -> None:
    if label is None:
        table.pop(key, None)
    else:
        if not _NAME.match(label):
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
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise LabelStoreError(f'{where}: expected an object with "version": 1')
    domains = doc.get("domains", {})
    if not isinstance(domains, dict):
        raise LabelStoreError(f'{where}: "domains" must be an object')
    store = LabelStore()
    try:
        for key, label in _str_map(domains.get("uuid", {}), "domains.uuid").items():
            store = store.with_domain(uuid=key, label=label)
        for key, label in _str_map(domains.get("name", {}), "domains.name").items():
            store = store.with_domain(name=key, label=label)
        for key, label in _str_map(doc.get("resources", {}), "resources").items():
            store = store.with_resource(key if not key.startswith("disk:") else key[5:], label)
    except LabelStoreError as exc:
        raise LabelStoreError(f"{where}: {exc}") from None
    return store


def load_label_store(path: Path) -> LabelStore:
    """Read the store; a missing file is an empty store, an unreadable or bad one an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return LabelStore()
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelStoreError(f"{path}: cannot read label store: {exc}") from None
    return parse_label_store(text, str(path))


def save_label_store(store: LabelStore, path: Path) -> None:
    """Write the store atomically: readers see the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, store.to_json().encode(), mode=0o640)
