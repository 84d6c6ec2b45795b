"""Build a binary Xen FLASK policy from an sHype policy (edge: files and subprocesses).

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

import argparse
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Final, TextIO

import attrs

from shyped.control.protocol import ControlError
from shyped.control.views import parse_policy
from shyped.fileio.atomicfile import write_atomic
from shyped.fileio.boundedread import POLICY_MAX_BYTES, InputFileError, read_bounded
from shyped.policy.flask import (
    MODULE_NAME,
    XEN_MODULES_AFTER,
    XEN_MODULES_BEFORE,
    compile_policy,
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


def build(module: str, xen_source: Path, cache: Path = DEFAULT_CACHE) -> BuildResult:
    """policy.conf and the binary policy for the generated `module` text."""
    tree = policy_tree(xen_source, cache)
    with tempfile.TemporaryDirectory(prefix="shyped-flask-") as d:
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


# --------------------------------------------------------------------------- shypectl policy flask


def add_command(policy_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``shypectl policy flask`` (offline: no daemon is asked)."""
    p = policy_sub.add_parser(
        "flask",
        help="compile a policy FILE to a Xen FLASK policy (offline)",
        description="Compile the sHype policy FILE (TOML or ACM XML) to a Xen FLASK policy: "
        "by default the binary for `xl loadpolicy` / Xen's multiboot policy module (needs -o); "
        "--source writes the complete FLASK policy source (policy.conf, what checkpolicy "
        "compiles), --module only the generated module. Needs Xen's source tarball for its "
        "policy tree (--xen-source or $SHYPED_XEN_SOURCE; extracted once into --cache) and "
        "m4 and checkpolicy; --module needs neither. See docs/flask.md.",
    )
    p.add_argument("file", type=Path, help="sHype policy file (TOML or ACM XML)")
    p.add_argument("-o", "--output", type=Path, help="write here (default: stdout, text only)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--source", action="store_true", help="FLASK policy source (policy.conf)")
    kind.add_argument("--module", action="store_true", help="only the generated module (.te)")
    p.add_argument(
        "--xen-source",
        type=Path,
        default=Path(DEFAULT_XEN_SOURCE) if DEFAULT_XEN_SOURCE else None,
        help="Xen source tarball (default $SHYPED_XEN_SOURCE)",
    )
    p.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"tree cache (default {DEFAULT_CACHE})"
    )


def run_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``shypectl policy flask``: 0 written, 2 bad input or usage, 3 the build failed."""
    try:
        text = read_bounded(args.file, POLICY_MAX_BYTES, "policy").decode("utf-8")
        policy, _ = parse_policy(text, str(args.file))
    except (OSError, InputFileError, UnicodeDecodeError) as e:
        print(f"shypectl: cannot read policy {args.file}: {e}", file=err)
        return 2
    except ControlError as e:
        print(f"shypectl: {e.message}", file=err)
        for item in e.details.get("problems", [])[:100]:
            print(f"  {item}", file=err)
        return 2
    module = compile_policy(policy).module
    data: bytes
    if args.module:
        data = module.encode("ascii")
    else:
        if args.xen_source is None:
            need = "--xen-source TARBALL or $SHYPED_XEN_SOURCE"
            print(f"shypectl: Xen's policy tree is needed: {need}", file=err)
            return 2
        if not args.source and args.output is None:
            print("shypectl: the binary policy needs -o OUT (or use --source)", file=err)
            return 2
        try:
            result = build(module, args.xen_source, args.cache)
        except FlaskBuildError as e:
            print(f"shypectl: {e}", file=err)
            return 3
        data = result.policy_conf.encode("ascii") if args.source else result.binary
    if args.output is None:
        out.write(data.decode("ascii"))
        return 0
    try:
        write_atomic(args.output, data, mode=0o644)
    except OSError as e:
        print(f"shypectl: cannot write {args.output}: {e}", file=err)
        return 2
    print(f"wrote {args.output} ({len(data)} bytes)", file=out)
    return 0
