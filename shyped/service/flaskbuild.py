"""Build a binary Xen FLASK policy from an sHype policy (edge: files and subprocesses; used
by ``shypectl policy flask`` and by the daemon's Xen/FLASK edge, `shyped.service.flaskxen`).

`shyped.policy.flask` writes the module; this file supplies Xen's policy tree and runs the
tools, as Xen's ``tools/flask/policy/Makefile.common`` does:

1. Xen's policy tree (``tools/flask/policy`` and ``xen/xsm/flask/policy``) is extracted from
   the Xen source tarball into a cache directory named by the tarball's sha256
   (``/var/cache/shyped-flask/<sha>/``), once; another tarball gets another directory.
   Nothing of Xen's is copied into this repository.
2. ``m4 -D self_contained_policy -s …`` over Xen's sections, with Xen's modules ``xen``,
   ``dom0``, the generated ``shype.te`` and ``all_system_role`` (`XEN_MODULES_*`), gives
   ``policy.conf``;
3. ``checkpolicy -t Xen -c 30 policy.conf -o <binary>`` (policy version 30: Xen 4.17 and
   Debian's checkpolicy 3.4 both speak it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Final

import attrs

from shyped.policy.flask import (
    MODULE_NAME,
    XEN_MODULES_AFTER,
    XEN_MODULES_BEFORE,
)

#: Where extracted policy trees are cached (one directory per tarball sha256).
DEFAULT_CACHE: Final = Path(os.environ.get("SHYPED_FLASK_CACHE", "/var/cache/shyped-flask"))
#: The Xen source tarball (``git archive`` of a Xen release); overridable per call.
DEFAULT_XEN_SOURCE: Final = os.environ.get("SHYPED_XEN_SOURCE", "")
#: Binary policy version (Xen 4.17 accepts 24 and 30).
POLICY_VERSION: Final = 30
#: The tarball members needed (prefixes).
TREE_PATHS: Final = ("tools/flask/policy/", "xen/xsm/flask/policy/")
#: Bound on a tool's run (checkpolicy takes well under a second on these policies).
TOOL_TIMEOUT_S: Final = 120.0


class FlaskBuildError(RuntimeError):
    """The policy could not be built (missing tarball or tool, or a tool failed)."""


@attrs.frozen
class BuildResult:
    """What a build produced: the m4 output and the binary policy."""

    policy_conf: str
    binary: bytes


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def policy_tree(xen_source: Path, cache: Path = DEFAULT_CACHE) -> Path:
    """The extracted policy tree of `xen_source` (a .tar.xz), extracting it on first use."""
    if not xen_source.is_file():
        raise FlaskBuildError(f"Xen source tarball {xen_source} not found")
    try:
        dest = cache / _sha256(xen_source)
    except OSError as e:
        raise FlaskBuildError(f"cannot read {xen_source}: {e}") from e
    if (dest / "tools/flask/policy/modules/xen.if").is_file():
        return dest
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache))
    except OSError as e:
        raise FlaskBuildError(f"cannot use the cache {cache} (--cache DIR): {e}") from e
    try:
        with tarfile.open(xen_source) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(TREE_PATHS)]
            if not members:
                raise FlaskBuildError(f"{xen_source} holds no {' or '.join(TREE_PATHS)}")
            tar.extractall(tmp, members=members, filter="data")
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / "tools/flask/policy/modules/xen.if").is_file():
                raise
    except (OSError, tarfile.TarError) as e:
        raise FlaskBuildError(f"cannot extract Xen's policy tree from {xen_source}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _sections(tree: Path, module: Path) -> list[Path]:
    """Xen's POLICY_SECTIONS, in Makefile.common's order, with our module list."""
    pol = tree / "tools/flask/policy/policy"
    mods = tree / "tools/flask/policy/modules"
    hv = tree / "xen/xsm/flask/policy"
    modules = [mods / f"{m}.te" for m in XEN_MODULES_BEFORE]
    modules.append(module)
    modules += [mods / f"{m}.te" for m in XEN_MODULES_AFTER]
    interfaces = [p.with_suffix(".if") for p in modules if p.with_suffix(".if").is_file()]
    constraints = [p.with_suffix(".cons") for p in modules if p.with_suffix(".cons").is_file()]
    return [
        hv / "security_classes",
        pol / "security_classes",
        hv / "initial_sids",
        hv / "access_vectors",
        pol / "access_vectors",
        *sorted((pol / "support").glob("*.spt")),
        pol / "mls",
        *interfaces,
        pol / "global_tunables",
        *modules,
        pol / "users",
        *constraints,
        pol / "initial_sids",
        pol / "device_contexts",
    ]


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=TOOL_TIMEOUT_S)
    except FileNotFoundError as e:
        raise FlaskBuildError(f"{argv[0]} not found (apt-get install checkpolicy m4)") from e
    except subprocess.TimeoutExpired as e:
        raise FlaskBuildError(f"{argv[0]} took longer than {TOOL_TIMEOUT_S:.0f} s") from e
    if proc.returncode != 0:
        msg = proc.stderr.decode("utf-8", "replace").strip()[-2000:]
        raise FlaskBuildError(f"{argv[0]} failed (exit {proc.returncode}): {msg}")
    return proc


def build(
    module: str, xen_source: Path, cache: Path = DEFAULT_CACHE, *, work_in: Path | None = None
) -> BuildResult:
    """policy.conf and the binary policy for the generated `module` text. The tools work in
    a temporary directory under `work_in` (None: the system's, e.g. ``/tmp``), removed after.
    The daemon passes its cache directory: under the unit's ``ProtectSystem=strict``, ``/tmp``
    is read-only (and deliberately not private), the ``CacheDirectory=`` is writable."""
    tree = policy_tree(xen_source, cache)
    try:
        tmp = tempfile.TemporaryDirectory(prefix=".build-", dir=work_in)
    except OSError as e:
        where = work_in or "the system's temporary directory"
        raise FlaskBuildError(f"cannot make a work directory in {where}: {e}") from e
    with tmp as d:
        work = Path(d)
        mod = work / f"{MODULE_NAME}.te"
        mod.write_text(module, encoding="ascii")
        m4 = ["m4", "-D", "self_contained_policy", "-s"]
        m4 += ["-D", "mls_num_sens=16", "-D", "mls_num_cats=256"]
        conf = _run([*m4, *map(str, _sections(tree, mod))], work).stdout
        (work / "policy.conf").write_bytes(conf)
        out = work / "policy.bin"
        _run(
            ["checkpolicy", "-t", "Xen", "-c", str(POLICY_VERSION), "policy.conf", "-o", str(out)],
            work,
        )
        return BuildResult(conf.decode("ascii", "replace"), out.read_bytes())
