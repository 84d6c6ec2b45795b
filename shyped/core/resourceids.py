"""Resource ids: how disks, bridges and PCI devices are named in the label store and matched
by the daemon (`resource_id`, pure), and what a disk id names now (`resolve_resource`, which
follows symlinks: the only I/O). Re-exported by `shyped.core.labelstore`."""

from __future__ import annotations

import os
import re
from typing import Final


class LabelStoreError(Exception):
    """A label store file or a resource name that cannot be used."""


#: A label, domain or bridge name.
_NAME = re.compile(r"^[A-Za-z0-9_.-][A-Za-z0-9_.+-]{0,127}\Z")


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
