"""``shypectl audit verify|tail``: check the audit chain and read the log.

`add_audit_commands` mounts the ``audit`` sub-command on shypectl's sub-parsers and `run` runs a
parsed command; `audit_verify` and `audit_tail` are the same as functions. Until shypectl
exists this is runnable on its own: ``python -m shyped.cli.auditcli [--dir DIR] verify|tail …``.

Exit status of ``verify``: 0 the chain is intact (documented losses are printed as warnings),
1 it is broken (or has warnings, with ``--strict``), 2 the log could not be read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from shyped.core.audit import Record, format_human
from shyped.core.auditverify import Anchor, Finding, Level, VerifyReport
from shyped.service.auditlog import (
    DEFAULT_DIRECTORY,
    STATE_NAME,
    Follower,
    list_log_files,
    read_state,
    tail_records,
    verify_files,
)

#: Findings printed per level before the rest are summarised.
MAX_PRINTED = 50


def _print_findings(findings: Sequence[Finding], out: TextIO) -> None:
    for level in (Level.ERROR, Level.WARNING, Level.NOTICE):
        items = [f for f in findings if f.level is level]
        for f in items[:MAX_PRINTED]:
            print(str(f), file=out)
        if len(items) > MAX_PRINTED:
            print(f"{level}: … and {len(items) - MAX_PRINTED} more", file=out)


def _summary(report: VerifyReport, state_status: str | None) -> str:
    count = f"{report.records} record(s) in {report.files} file(s)"
    if report.first_seq is not None:
        count += f", seq {report.first_seq}..{report.last_seq}"
    if report.ok:
        head = f"; head {report.last_hash[:16]}…" if report.last_hash else ""
        log = f"; log {report.log}" if report.log else ""
        state = f"; state file {state_status}" if state_status else ""
        return f"OK: {count}{log}{head}{state}"
    first = report.first_error
    assert first is not None
    n_err, n_warn = len(report.errors), len(report.warnings)
    return (
        f"BROKEN: first broken record: {first.where or '(whole log)'}: {first.message}\n"
        f"        {n_err} error(s), {n_warn} warning(s); {count}"
    )


def audit_verify(
    files: Sequence[Path] = (),
    *,
    directory: Path = DEFAULT_DIRECTORY,
    state: Path | None = None,
    json_output: bool = False,
    strict: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Verify the chain of `files` (in order), or of every file in `directory` with its state.

    With explicit files the state file is used only if given (`state`), and a log that starts
    after seq 0 is a notice rather than an error (earlier files may simply not be listed).
    """
    status: str | None = None
    anchor: Anchor | None = None
    if files:
        paths, complete = list(files), False
        if state is not None:
            anchor, status = read_state(state)
    else:
        if not directory.is_dir():
            print(f"audit verify: {directory}: no such directory", file=err)
            return 2
        paths, complete = list_log_files(directory), True
        anchor, status = read_state(state or directory / STATE_NAME)
    try:
        report = verify_files(paths, anchor=anchor, complete=complete)
    except OSError as e:
        print(f"audit verify: {e.filename or ''}: {e.strerror or e}", file=err)
        return 2
    if status == "corrupt":
        report = VerifyReport(
            findings=(
                *report.findings,
                Finding(Level.WARNING, "state file unreadable (torn or altered); not used"),
            ),
            files=report.files,
            records=report.records,
            log=report.log,
            first_seq=report.first_seq,
            last_seq=report.last_seq,
            last_hash=report.last_hash,
        )
    failed = not report.ok or (strict and bool(report.warnings))
    if json_output:
        doc: dict[str, Any] = report.to_json()
        doc["state_file"] = status
        doc["ok"] = not failed
        print(json.dumps(doc, indent=2, sort_keys=True), file=out)
    else:
        _print_findings(report.findings, out)
        print(_summary(report, status), file=out)
    return 1 if failed else 0


def _show(record: Record, json_output: bool, out: TextIO) -> None:
    if json_output:
        out.write(record.line.decode("utf-8"))
    else:
        print(format_human(record), file=out)


def audit_tail(
    *,
    follow: bool = False,
    denied_only: bool = False,
    json_output: bool = False,
    directory: Path = DEFAULT_DIRECTORY,
    lines: int = 10,
    interval: float = 0.5,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    stop: Callable[[], bool] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print the last `lines` records (denials only if asked); with `follow`, keep printing
    new ones across rotations until `stop()` is true or Ctrl-C."""
    if not directory.is_dir():
        print(f"audit tail: {directory}: no such directory", file=err)
        return 2
    try:
        backlog = tail_records(directory, lines, denied_only=denied_only)
        for rec in backlog:
            _show(rec, json_output, out)
        out.flush()
        if not follow:
            return 0
        after = backlog[-1].seq if backlog else None
        follower = Follower(directory, after_seq=after)
        try:
            while stop is None or not stop():
                for rec in follower.poll():
                    if rec.denied or not denied_only:
                        _show(rec, json_output, out)
                out.flush()
                sleep(interval)
        finally:
            follower.close()
    except KeyboardInterrupt:
        return 0
    except OSError as e:
        print(f"audit tail: {e.filename or directory}: {e.strerror or e}", file=err)
        return 2
    return 0


# ------------------------------------------------------------------------------- argparse


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--dir`` and the ``verify`` / ``tail`` sub-commands to `parser`."""
    parser.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIRECTORY,
        metavar="DIR",
        help=f"the audit directory (default {DEFAULT_DIRECTORY})",
    )
    sub = parser.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    v = sub.add_parser(
        "verify",
        help="check the hash chain and name the first broken record",
        description="Check every record's hash and the chain between them (seq, prev, log "
        "id, file boundaries, retention). Without FILES: every log file of the directory, "
        "checked against its state file so that records cut off the end are found too.",
    )
    v.add_argument("files", nargs="*", type=Path, metavar="FILE", help="log files, in order")
    v.add_argument("--state", type=Path, help="state file to check the head against")
    # SUPPRESS: an absent --json leaves a parent parser's global --json (shypectl --json …) be.
    v.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="a JSON report")
    v.add_argument("--strict", action="store_true", help="documented losses fail too")
    v.add_argument(
        "--pool",
        action="store_true",
        help="pool mode: also check the chain against this host's head anchored in etcd "
        "(endpoints, prefix and host from --config)",
    )
    v.add_argument(
        "--config",
        type=Path,
        default=Path("/etc/shyped/shyped.toml"),
        help="the daemon's configuration, for --pool (default /etc/shyped/shyped.toml)",
    )
    v.set_defaults(audit_func=_run_verify)
    t = sub.add_parser(
        "tail",
        help="print the last records; -f follows new ones",
        description="Print the last records of the audit log, human-readable or as JSON "
        "lines; with -f keep printing new records, across file rotations.",
    )
    t.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    t.add_argument("--denied", action="store_true", help="denials only")
    t.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="the records' JSON lines"
    )
    t.add_argument("-n", "--lines", type=int, default=10, help="records to show (default 10)")
    t.add_argument("--interval", type=float, default=0.5, help="seconds between polls with -f")
    t.set_defaults(audit_func=_run_tail)
    return parser


def add_audit_commands(subparsers: Any, name: str = "audit") -> argparse.ArgumentParser:
    """Mount ``audit verify|tail`` on shypectl's `subparsers` (from ``add_subparsers``)."""
    parser = subparsers.add_parser(
        name, help="verify and read the audit log", description=__doc__.split("\n\n")[0]
    )
    return configure_parser(parser)


def _run_verify(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    status = audit_verify(
        args.files,
        directory=args.dir,
        state=args.state,
        json_output=getattr(args, "json", False),
        strict=args.strict,
        out=out,
        err=err,
    )
    if getattr(args, "pool", False):
        from shyped.cli.shypectl_pool import verify_pool

        status = max(status, verify_pool(args.dir, args.config, out, err))
    return status


def _run_tail(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    return audit_tail(
        follow=args.follow,
        denied_only=args.denied,
        json_output=getattr(args, "json", False),
        directory=args.dir,
        lines=args.lines,
        interval=args.interval,
        out=out,
        err=err,
    )


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run a command parsed by a parser set up with `configure_parser`."""
    func: Callable[[argparse.Namespace, TextIO, TextIO], int] = args.audit_func
    return func(args, out, err)


def build_parser() -> argparse.ArgumentParser:
    return configure_parser(
        argparse.ArgumentParser(
            prog="python -m shyped.cli.auditcli", description=__doc__.split("\n\n")[0]
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
