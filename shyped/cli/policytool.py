"""shypectl's offline policy verbs: ``lint``, ``analyse``, ``can``, ``convert``,
``check-labels`` (FILE in, no daemon asked), a thin front end over `shyped.policy`.

They sit beside ``shypectl policy graph FILE``, ``diff OLD NEW`` and ``flask FILE``, which
read files too, so a policy author has one tool, with or without a running daemon.

Exit status: 0 ok; 1 the answer is no (lint: errors, or warnings with ``--strict``;
``can``: no flow; ``convert``: the target cannot express the policy; ``check-labels``:
errors, or warnings with ``--strict``); 2 usage or unreadable/invalid input; 5 ``can``
named a label the policy lacks.
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Any

from shyped.cli.ctlcommon import EXIT_DENIED, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, Ctx, UsageError
from shyped.core.labelstore import label_store_problems
from shyped.fileio.boundedread import LABELS_MAX_BYTES, POLICY_MAX_BYTES, read_bounded
from shyped.policy import convert
from shyped.policy.analysis import analyse
from shyped.policy.errors import PolicyError
from shyped.policy.lint import Located, format_text, lint, load_located
from shyped.policy.query import can_talk, summary, summary_lines


def _read(path: Path, what: str, cap: int = POLICY_MAX_BYTES) -> bytes:
    try:
        return read_bounded(path, cap, what)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def load_file(path: Path) -> Located:
    """A valid policy file with its lines; `UsageError` listing every problem."""
    try:
        return load_located(_read(path, "policy"), str(path))
    except PolicyError as e:
        raise UsageError(
            f"policy {path} is not valid:\n" + "\n".join(map(str, e.problems))
        ) from None


def _dump(ctx: Ctx, doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True), file=ctx.out)


def cmd_lint(ctx: Ctx) -> int:
    path: Path = ctx.args.file
    report = lint(_read(path, "policy"), str(path))
    if ctx.json:
        doc = report.to_json()
        doc["failed"] = report.failed(ctx.args.strict)
        _dump(ctx, doc)
    else:
        for line in format_text(report):
            ctx.say(line)
    return EXIT_DENIED if report.failed(ctx.args.strict) else EXIT_OK


def cmd_analyse(ctx: Ctx) -> int:
    a = analyse(load_file(ctx.args.file).policy)
    if ctx.json:
        _dump(ctx, summary(a))
    else:
        for line in summary_lines(a):
            ctx.say(line)
    return EXIT_OK


def cmd_can(ctx: Ctx) -> int:
    a = analyse(load_file(ctx.args.file).policy)
    try:
        ans = can_talk(a, ctx.args.source, ctx.args.target)
    except KeyError as e:
        name = str(e.args[0])
        names = [v.name for v in a.policy.vm_labels]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        msg = f"policy {a.policy.name!r} has no VM label {name!r}{hint}"
        if ctx.json:
            _dump(ctx, {"error": {"code": "not-found", "message": msg}})
        else:
            print(f"shypectl: {msg}", file=ctx.err)
        return EXIT_NOT_FOUND
    if ctx.json:
        _dump(ctx, ans.to_json())
    else:
        word = {"direct": "yes", "indirect": "yes, indirectly", "no": "no"}[ans.verdict]
        ctx.say(f"{word}: {ans.reason}")
    return EXIT_OK if ans.yes else EXIT_DENIED


def cmd_convert(ctx: Ctx) -> int:
    path: Path = ctx.args.file
    src = load_file(path)
    target = ctx.args.to or ("toml" if src.format == "acm-xml" else "acm-xml")
    try:
        if target == src.format:
            raise UsageError(f"{path} is {src.format} already")
        if target == "acm-xml":
            data = convert.to_acm_xml(src.policy, src.line_of, str(path))
        else:
            assert src.acm is not None
            text = convert.to_toml(
                src.acm, src.line_of, str(path), drop_header=ctx.args.drop_header
            )
            data = text.encode()
    except convert.ConvertRefused as e:
        hint = " (--drop-header leaves the header out)" if target == "toml" else ""
        if ctx.json:
            _dump(ctx, {"converted": False, "to": target, "problems": [str(p) for p in e.problems]})
        else:
            print(f"shypectl: {path} cannot be written as {target}{hint}:", file=ctx.err)
            for p in e.problems:
                print(f"  {p}", file=ctx.err)
        return EXIT_DENIED
    out: Path | None = ctx.args.output
    if out is None:
        ctx.out.write(data.decode())
    else:
        try:
            out.write_bytes(data)
        except OSError as exc:
            raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
        if ctx.json:
            _dump(ctx, {"converted": True, "to": target, "output": str(out)})
        else:
            ctx.say(f"wrote {out} ({target})")
    return EXIT_OK


def cmd_check_labels(ctx: Ctx) -> int:
    policy = load_file(ctx.args.policy).policy
    store: Path = ctx.args.store
    try:
        text = _read(store, "label store", LABELS_MAX_BYTES).decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"label store {store} is not UTF-8 text") from None
    problems = label_store_problems(text, str(store), policy)
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    failed = errors > 0 or (ctx.args.strict and warnings > 0)
    if ctx.json:
        _dump(
            ctx,
            {
                "errors": errors,
                "warnings": warnings,
                "failed": failed,
                "problems": [
                    {"severity": p.severity, "message": p.message, "file": p.file, "line": p.line}
                    for p in problems
                ],
            },
        )
    else:
        for p in problems:
            ctx.say(str(p))
        ctx.say(
            f"{store}: against {policy.name} {policy.version}: "
            f"{errors} error(s), {warnings} warning(s)"
        )
    return EXIT_DENIED if failed else EXIT_OK


def add_commands(psub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the offline verbs under ``shypectl policy``."""
    p = psub.add_parser(
        "lint",
        help="every problem of a policy FILE at its line, plus warnings (offline)",
        description="Check a policy FILE (TOML or ACM XML) without a daemon: syntax, keys, "
        "types, references, every problem at file:line in one run, plus warnings from the "
        "analysis (never-admissible, mute and isolated labels, unusable resource labels, inert "
        "conflict sets, unused types). `shypectl --json policy lint FILE` for scripts. Exit 0 "
        "clean, 1 errors (or warnings with --strict), 2 unreadable. See docs/policy.md.",
    )
    p.add_argument("file", type=Path, help="policy file (TOML or ACM XML)")
    p.add_argument("--strict", action="store_true", help="warnings fail too (exit 1)")
    p.set_defaults(func=cmd_lint)

    p = psub.add_parser(
        "analyse",
        aliases=["analyze"],
        help="who may talk to whom, indirect flows, never-together (offline)",
        description="Print what a policy FILE allows: label pairs that may talk, pairs that "
        "reach each other only through a third domain, pairs that never run together, who may "
        "use each resource, and what is dead (docs/policy-analysis.md).",
    )
    p.add_argument("file", type=Path, help="policy file (TOML or ACM XML)")
    p.set_defaults(func=cmd_analyse)

    p = psub.add_parser(
        "can",
        help="can a domain labelled SOURCE get information to one labelled TARGET? (offline)",
        description="Answer yes (a channel is permitted and they can run side by side), yes "
        "indirectly (through a chain of labels that can each talk to the next), or no, with "
        "the reason. Exit 0 yes, 1 no, 5 unknown label.",
    )
    p.add_argument("file", type=Path, help="policy file (TOML or ACM XML)")
    p.add_argument("source", help="VM label")
    p.add_argument("target", help="VM label")
    p.set_defaults(func=cmd_can)

    p = psub.add_parser(
        "convert",
        help="TOML to ACM XML or back, refusing what the target cannot express (offline)",
        description="Convert a policy FILE between shyped TOML and Xen ACM XML. Refused (exit "
        "1, every reason at its line): MLS, quotas or defaults other than __UNLABELED__ to XML; "
        "the ACM header's PolicyUrl/Reference/Date/NameSpaceUrl and priority attributes to "
        "TOML (unless --drop-header). Comments are not carried.",
    )
    p.add_argument("file", type=Path, help="policy file (TOML or ACM XML)")
    p.add_argument("--to", choices=("toml", "acm-xml"), help="target (default: the other one)")
    p.add_argument("-o", "--output", type=Path, help="write here (default: stdout)")
    p.add_argument(
        "--drop-header", action="store_true", help="XML to TOML: leave the ACM header fields out"
    )
    p.set_defaults(func=cmd_convert)

    p = psub.add_parser(
        "check-labels",
        help="check a label store file against a policy FILE (offline)",
        description="Check a label store (labels.json) against a policy: JSON syntax, unknown "
        "keys (with did you mean), bad uuids, names and resource ids, keys given twice "
        "(errors: the daemon refuses such a store); labels the policy lacks (warnings: the "
        "daemon denies those domains and resources). Exit 0, 1 errors (or warnings with "
        "--strict), 2 unreadable.",
    )
    p.add_argument("policy", type=Path, help="policy file (TOML or ACM XML)")
    p.add_argument("store", type=Path, help="label store (JSON)")
    p.add_argument("--strict", action="store_true", help="warnings fail too (exit 1)")
    p.set_defaults(func=cmd_check_labels)


__all__ = ["EXIT_USAGE", "add_commands", "load_file"]
