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

import pytest

from shyped import flaskbuild
from shyped.policy.flask import DOM0_TYPE, FlaskPolicy

XEN_SOURCE: Final = Path(
    os.environ.get("SHYPED_XEN_SOURCE", "/work/shared/xen-4.17.7-flask/xen-4.17.7-hv.tar.xz")
)
SYSTEM_PYTHON: Final = "/usr/bin/python3"

_DUMP: Final = """
import json, sys
import setools
p = setools.SELinuxPolicy(sys.argv[1])
out = []
for r in setools.TERuleQuery(p, ruletype=["allow"]).results():
    for e in r.expand():
        out.append([str(e.source), str(e.target), str(e.tclass), sorted(map(str, e.perms))])
print(json.dumps(out))
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


def allow_rules(binary: Path) -> list[tuple[str, str, str, list[str]]]:
    """Every allow rule of a binary policy, expanded (setools)."""
    proc = subprocess.run(
        [SYSTEM_PYTHON, "-c", _DUMP, str(binary)], capture_output=True, check=True, text=True
    )
    return [tuple(r) for r in json.loads(proc.stdout)]  # type: ignore[misc]


def _owner(fp: FlaskPolicy) -> dict[str, tuple[str, str]]:
    """type → (domain type it belongs to, role: dom/self/channel)."""
    out: dict[str, tuple[str, str]] = {}
    for s in fp.subjects:
        out[s.type] = (s.type, "dom")
        out[f"{s.type}_channel"] = (s.type, "channel")
        if s.type != DOM0_TYPE:  # dom0 is a singleton domain: its _self is dom0_t itself
            out[f"{s.type}_self"] = (s.type, "self")
    return out


def observed(
    fp: FlaskPolicy, rules: list[tuple[str, str, str, list[str]]]
) -> dict[tuple[str, str], set[Rule]]:
    """(domain type A, domain type B) → every (role, role, class, perm) allowed from A to B."""
    owner = _owner(fp)
    out: dict[tuple[str, str], set[Rule]] = defaultdict(set)
    for src, tgt, cls, perms in rules:
        a, b = owner.get(src), owner.get(tgt)
        if a is None or b is None:
            continue  # a rule with Xen itself, a device or an attribute-only type
        out[(a[0], b[0])].update((a[1], b[1], cls, p) for p in perms)
    return out
