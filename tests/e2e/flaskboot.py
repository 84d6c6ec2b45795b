"""How the e2e tier boots Xen with FLASK: the hypervisor from flaskxen.py, `flask=<mode>` on
its command line and a binary FLASK policy as the last multiboot module, compiled from an sHype
policy file by shyped's own compiler (`shypectl policy flask FILE -o OUT`).

The first policy is loaded at boot, never at run time first: Xen labels an event channel when
it is allocated, so channels dom0 opened before any policy existed would carry a context the
policy never allows (shared/xen-4.17.7-flask/README.md: `avc: denied { send }` between dom0's
own channels, vbd backends that never connect).  Without a policy module, `flask=enforcing`
panics Xen at boot; `flask_hypervisor` refuses that combination up front.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

from flaskxen import FlaskXen, xen_source
from imagetree import BuildError
from runner import Hypervisor

from shyped.cli import shypectl

FlaskMode = Literal["enforcing", "permissive", "disabled"]


def compile_flask_policy(policy_file: Path, out: Path) -> Path:
    """`shypectl policy flask policy_file -o out` (Xen's policy tree from the same tarball
    the hypervisor is built from); returns `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["policy", "flask", str(policy_file), "-o", str(out), "--xen-source", str(xen_source())]
    status = shypectl.run(argv, stdout, stderr)
    if status != 0 or not out.is_file():
        raise BuildError(
            f"shypectl {' '.join(argv)} exited {status}: {stderr.getvalue()}{stdout.getvalue()}"
        )
    return out


def flask_hypervisor(
    xen: FlaskXen, *, mode: FlaskMode = "enforcing", policy_binary: Path | None = None
) -> Hypervisor:
    """The FLASK Xen with `flask=mode`, booting `policy_binary` (a compiled FLASK policy)."""
    if mode == "enforcing" and policy_binary is None:
        raise ValueError("flask=enforcing without a policy module panics Xen at boot")
    modules = (policy_binary,) if policy_binary is not None else ()
    return Hypervisor(xen=xen.xen, cmdline=f"flask={mode}", modules=modules, name="flask")
