"""``shypectl policy flask``: compile an sHype policy FILE to a Xen FLASK policy, offline.

The build itself (Xen's policy tree, m4, checkpolicy) is `shyped.service.flaskbuild`, which the
daemon uses too.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TextIO

from shyped.control.protocol import ControlError
from shyped.control.views import parse_policy
from shyped.fileio.atomicfile import write_atomic
from shyped.fileio.boundedread import POLICY_MAX_BYTES, InputFileError, read_bounded
from shyped.policy.flask import compile_policy
from shyped.service.flaskbuild import DEFAULT_CACHE, DEFAULT_XEN_SOURCE, FlaskBuildError, build


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
