"""Helpers for the FLASK compiler tests: build a binary policy and read it back with setools.

setools (Debian's ``python3-setools``, what ``sesearch`` is built on) lives in the system
Python, not in the venv, so the binary policy is read by a small script run with
``/usr/bin/python3``: every ``allow`` rule, attributes expanded to types, as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Final

import attrs
import pytest

from shyped.policy.flask import DOM0_TYPE, UNLABELLED_TYPE, FlaskPolicy, type_name
from shyped.policy.model import Policy
from shyped.service import flaskbuild

XEN_SOURCE: Final = Path(
    os.environ.get("SHYPED_XEN_SOURCE", "/work/shared/xen-4.17.7-flask/xen-4.17.7-hv.tar.xz")
)
SYSTEM_PYTHON: Final = "/usr/bin/python3"

_DUMP: Final = """
import json, sys
import setools
p = setools.SELinuxPolicy(sys.argv[1])
rules = []
for r in setools.TERuleQuery(p, ruletype=["allow"]).results():
    for e in r.expand():
        rules.append([str(e.source), str(e.target), str(e.tclass), sorted(map(str, e.perms))])
doms = [str(t) for a in p.typeattributes() if str(a) == "domain_type" for t in a.expand()]
print(json.dumps({"rules": rules, "domain_types": sorted(doms)}))
"""

#: (source role, target role, class, permission) of a channel between two domain types.
COMM_PAIR: Final = frozenset(
    {("channel", "dom", "event", "bind")}
    | {("dom", "dom", "grant", p) for p in ("map_read", "map_write", "copy", "unmap")}
)
#: The same, of a domain with itself (domain_self_comms).
COMM_SELF: Final = frozenset(
    {("channel", "self", "event", "bind")}
    | {("dom", "self", "grant", p) for p in ("map_read", "map_write", "copy", "unmap")}
)

Rule = tuple[str, str, str, str]


def _tools_missing() -> str | None:
    for tool in ("m4", "checkpolicy"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install-deps.sh)"
    if not XEN_SOURCE.is_file():
        return f"Xen source tarball {XEN_SOURCE} not found (SHYPED_XEN_SOURCE)"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import setools"], capture_output=True)
    if probe.returncode != 0:
        return "setools is not installed for the system python (apt-get install setools)"
    return None


needs_flask_tools = pytest.mark.skipif(_tools_missing() is not None, reason=str(_tools_missing()))


def cache_dir(tmp_root: Path) -> Path:
    """The build cache: the default one if writable, else one under `tmp_root`."""
    default = flaskbuild.DEFAULT_CACHE
    try:
        default.mkdir(parents=True, exist_ok=True)
    except OSError:
        return tmp_root / "flask-cache"
    return default if os.access(default, os.W_OK) else tmp_root / "flask-cache"


def build_binary(fp: FlaskPolicy, cache: Path, out: Path) -> Path:
    """Compile `fp` with checkpolicy into `out`."""
    out.write_bytes(flaskbuild.build(fp.module, XEN_SOURCE, cache).binary)
    return out


@attrs.frozen
class BinaryPolicy:
    """What setools read from a binary policy."""

    rules: list[tuple[str, str, str, list[str]]]
    domain_types: frozenset[str]  # every type with the attribute domain_type


def read_binary(binary: Path) -> BinaryPolicy:
    """Every allow rule of a binary policy, expanded, and its domain types (setools)."""
    proc = subprocess.run(
        [SYSTEM_PYTHON, "-c", _DUMP, str(binary)], capture_output=True, check=True, text=True
    )
    doc = json.loads(proc.stdout)
    return BinaryPolicy([tuple(r) for r in doc["rules"]], frozenset(doc["domain_types"]))


def expected_subjects(policy: Policy) -> list[tuple[str, str | None]]:
    """(domain type, label) as docs/flask.md maps them: dom0, every VM label, unlabelled."""
    out: list[tuple[str, str | None]] = [(DOM0_TYPE, policy.bootstrap)]
    out += [(type_name(lab.name), lab.name) for lab in policy.vm_labels]
    out.append((UNLABELLED_TYPE, None))
    return out


def _owner(subjects: list[tuple[str, str | None]]) -> dict[str, tuple[str, str]]:
    """type → (domain type it belongs to, role: dom/self/channel)."""
    out: dict[str, tuple[str, str]] = {}
    for t, _label in subjects:
        out[t] = (t, "dom")
        out[f"{t}_channel"] = (t, "channel")
        if t != DOM0_TYPE:  # dom0 is a singleton domain: its _self is dom0_t itself
            out[f"{t}_self"] = (t, "self")
    return out


def observed(
    subjects: list[tuple[str, str | None]], rules: list[tuple[str, str, str, list[str]]]
) -> dict[tuple[str, str], set[Rule]]:
    """(domain type A, domain type B) → every (role, role, class, perm) allowed from A to B."""
    owner = _owner(subjects)
    out: dict[tuple[str, str], set[Rule]] = defaultdict(set)
    for src, tgt, cls, perms in rules:
        a, b = owner.get(src), owner.get(tgt)
        if a is None or b is None:
            continue  # a rule with Xen itself, a device or an attribute-only type
        out[(a[0], b[0])].update((a[1], b[1], cls, p) for p in perms)
    return out
