"""``shypectl audit verify|tail|search``: check the audit chain, read and query the log.

`add_audit_commands` mounts the ``audit`` sub-command on shypectl's sub-parsers and `run` runs a
parsed command; `audit_verify`, `audit_tail` and `audit_search` are the same as functions. The
directory is ``--dir``, else the ``[audit] directory`` of the configuration (``--config``,
``$SHYPED_CONFIG``, /etc/shyped/shyped.toml), else /var/log/shyped/audit.

Exit status of ``verify``: 0 the chain is intact (documented losses are printed as warnings),
1 it is broken (or has warnings, with ``--strict``), 2 the log could not be read (missing or
unreadable directory or file). ``search``: 0 records matched, 1 none did (as ausearch), 2 bad
query or unreadable log.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from shyped.cli.auditquery import DECISIONS, Query, QueryError, parse_time, select
from shyped.cli.conventions import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    add_version,
    exit_guarded,
    os_error_text,
    seconds,
)
from shyped.core.audit import Record, format_human, iter_parsed
from shyped.core.auditverify import Anchor, Finding, Level, VerifyReport
from shyped.policy.decisions import Hook
from shyped.service.auditlog import (
    DEFAULT_DIRECTORY,
    STATE_NAME,
    Follower,
    list_log_files,
    read_lines,
    read_state,
    tail_records,
    verify_files,
)
from shyped.service.config import ConfigError, load_config

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
    paths, complete = list(files), False
    try:
        if files:
            if state is not None:
                anchor, status = read_state(state)
        elif not directory.is_dir():
            print(f"audit verify: {directory}: no such directory", file=err)
            return 2
        else:
            paths, complete = list_log_files(directory), True
            anchor, status = read_state(state or directory / STATE_NAME)
        report = verify_files(paths, anchor=anchor, complete=complete)
    except OSError as e:
        print(f"audit verify: {os_error_text(e)}", file=err)
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
    query: Query | None = None,
) -> int:
    """Print the last `lines` records (denials only if asked, those `query` matches if
    given); with `follow`, keep printing new ones across rotations until `stop()` is true or
    Ctrl-C."""

    def wanted(rec: Record) -> bool:
        return (rec.denied or not denied_only) and (query is None or query.matches(rec))

    try:
        if not directory.is_dir():
            print(f"audit tail: {directory}: no such directory", file=err)
            return 2
        if query is None:
            backlog = tail_records(directory, lines, denied_only=denied_only)
        else:
            backlog = [r for r in _records(directory) if wanted(r)][-lines:] if lines > 0 else []
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
                    if wanted(rec):
                        _show(rec, json_output, out)
                out.flush()
                sleep(interval)
        finally:
            follower.close()
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        raise  # the reader went away: shyped.cli.conventions.guarded ends quietly
    except OSError as e:
        print(f"audit tail: {os_error_text(e)}", file=err)
        return 2
    return 0


def _records(directory: Path) -> Iterator[Record]:
    """Every well-formed record of the log in `directory`, oldest first (read only)."""
    for path in list_log_files(directory):
        yield from iter_parsed(read_lines(path))


def audit_search(
    query: Query,
    *,
    directory: Path = DEFAULT_DIRECTORY,
    json_output: bool = False,
    last: int | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Print the records `query` matches (oldest first; the `last` ones if given). 0 if any
    matched, 1 if none (``<no matches>`` on stderr), 2 if the log could not be read."""
    try:
        if not directory.is_dir():
            print(f"audit search: {directory}: no such directory", file=err)
            return 2
        found = select(_records(directory), query, last)
    except OSError as e:
        print(f"audit search: {os_error_text(e)}", file=err)
        return 2
    for rec in found:
        _show(rec, json_output, out)
    if not found:
        print("<no matches>", file=err)
        return 1
    return 0


# ------------------------------------------------------------------------------- argparse


def _where_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--dir",
        type=Path,
        default=default,
        metavar="DIR",
        help="the audit directory (default: [audit] directory of the configuration, else "
        f"{DEFAULT_DIRECTORY})",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=default,
        metavar="FILE",
        help=f"the daemon's configuration, for its audit directory (default ${CONFIG_ENV} or "
        f"{DEFAULT_CONFIG})",
    )


def _filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--start",
        "-ts",
        nargs="+",
        metavar="WHEN",
        help="records at or after: now, recent, this-hour, boot, today, yesterday, "
        "this-week, week-ago, this-month, this-year, YYYY-MM-DD [HH:MM[:SS]] (local time "
        "unless Z or +HH:MM)",
    )
    parser.add_argument("--end", "-te", nargs="+", metavar="WHEN", help="records at or before")
    parser.add_argument(
        "--domain", action="append", default=[], help="name, domid or uuid (subject or object)"
    )
    parser.add_argument(
        "--label", action="append", default=[], help="label (bare or ACM:P:L) of either party"
    )
    parser.add_argument(
        "--hook",
        action="append",
        default=[],
        choices=[h.value for h in Hook],
        help="decision hook",
    )
    parser.add_argument("--decision", choices=DECISIONS, help="permit or deny")
    parser.add_argument(
        "--kind", "-m", action="append", default=[], help="record kind (decision, relabel, …)"
    )


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--dir``/``--config`` and the ``verify`` / ``tail`` / ``search`` sub-commands."""
    _where_options(parser, None)
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
    _where_options(v, argparse.SUPPRESS)
    v.add_argument(
        "--pool",
        action="store_true",
        help="pool mode: also check the chain against this host's head anchored in etcd "
        "(endpoints, prefix and host from the configuration)",
    )
    v.set_defaults(audit_func=_run_verify)
    t = sub.add_parser(
        "tail",
        help="print the last records; -f follows new ones",
        description="Print the last records of the audit log, human-readable or as JSON "
        "lines; with -f keep printing new records, across file rotations. The filters are "
        "those of search.",
    )
    t.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    t.add_argument("--denied", action="store_true", help="denials only")
    t.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="the records' JSON lines"
    )
    t.add_argument("-n", "--lines", type=int, default=10, help="records to show (default 10)")
    t.add_argument("--interval", type=seconds, default=0.5, help="seconds between polls with -f")
    _filter_options(t)
    _where_options(t, argparse.SUPPRESS)
    t.set_defaults(audit_func=_run_tail)
    q = sub.add_parser(
        "search",
        help="records by time, domain, label, hook, decision (as ausearch)",
        description="Print the records that match every criterion given (several values of "
        "one criterion: any of them), oldest first, as ausearch does for the Linux audit log. "
        "The log is only read: a search cannot break the chain. Exit status 0 when records "
        "matched, 1 when none did, 2 for a bad query or an unreadable log.",
    )
    _filter_options(q)
    q.add_argument("-n", "--last", type=int, help="only the last N matching records")
    q.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="the records' JSON lines"
    )
    _where_options(q, argparse.SUPPRESS)
    q.set_defaults(audit_func=_run_search)
    return parser


def add_audit_commands(subparsers: Any, name: str = "audit") -> argparse.ArgumentParser:
    """Mount ``audit verify|tail`` on shypectl's `subparsers` (from ``add_subparsers``)."""
    parser = subparsers.add_parser(
        name, help="verify and read the audit log", description=__doc__.split("\n\n")[0]
    )
    return configure_parser(parser)


class _BadArguments(Exception):
    pass


def _named_config(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Path | None:
    """The configuration named by ``--config`` or ``$SHYPED_CONFIG`` (None: neither)."""
    named: Path | None = getattr(args, "config", None)
    if named is None and environ.get(CONFIG_ENV):
        named = Path(environ[CONFIG_ENV])
    return named


def audit_directory(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Path:
    """``--dir``, else the configuration's ``[audit] directory``, else the default. A
    configuration named explicitly (``--config``, ``$SHYPED_CONFIG``) must load; the default
    one may be absent."""
    directory: Path | None = getattr(args, "dir", None)
    if directory is not None:
        return directory
    named = _named_config(args, environ)
    path = named if named is not None else DEFAULT_CONFIG
    if named is None and not os.path.lexists(path):
        return DEFAULT_DIRECTORY
    try:
        return load_config(path).audit.directory
    except ConfigError as exc:
        raise _BadArguments(f"{exc} (name the audit directory with --dir)") from None


def _query(args: argparse.Namespace) -> Query:
    now = datetime.now().astimezone()
    boot = _boot_time(now)
    try:
        start = parse_time(args.start, now, boot=boot) if args.start else None
        end = parse_time(args.end, now, end=True, boot=boot) if args.end else None
    except QueryError as exc:
        raise _BadArguments(str(exc)) from None
    return Query(
        start=start,
        end=end,
        domains=tuple(args.domain),
        labels=tuple(args.label),
        hooks=tuple(args.hook),
        decision=args.decision,
        kinds=tuple(args.kind),
    )


def _boot_time(now: datetime) -> datetime | None:
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return now - timedelta(seconds=uptime)


def _run_search(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    return audit_search(
        _query(args),
        directory=audit_directory(args),
        json_output=getattr(args, "json", False),
        last=args.last,
        out=out,
        err=err,
    )


def _run_verify(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    status = audit_verify(
        args.files,
        directory=audit_directory(args) if not args.files else DEFAULT_DIRECTORY,
        state=args.state,
        json_output=getattr(args, "json", False),
        strict=args.strict,
        out=out,
        err=err,
    )
    if getattr(args, "pool", False):
        from shyped.cli.shypectl_pool import verify_pool

        config = _named_config(args) or DEFAULT_CONFIG
        status = max(status, verify_pool(audit_directory(args), config, out, err))
    return status


def _run_tail(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    query = _query(args)
    return audit_tail(
        query=None if query == Query() else query,
        follow=args.follow,
        denied_only=args.denied,
        json_output=getattr(args, "json", False),
        directory=audit_directory(args),
        lines=args.lines,
        interval=args.interval,
        out=out,
        err=err,
    )


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run a command parsed by a parser set up with `configure_parser`."""
    func: Callable[[argparse.Namespace, TextIO, TextIO], int] = args.audit_func
    try:
        return func(args, out, err)
    except _BadArguments as exc:
        print(f"audit {args.audit_command}: {exc}", file=err)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shyped.cli.auditcli", description=__doc__.split("\n\n")[0]
    )
    add_version(parser, "shyped.cli.auditcli")
    return configure_parser(parser)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    exit_guarded(main, "shyped.cli.auditcli")
