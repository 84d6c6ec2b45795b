"""``shypectl audit verify|tail`` (today ``python -m shyped.cli.auditcli``)."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from audit_helpers import feed, small

from shyped.cli.auditcli import add_audit_commands, audit_tail, audit_verify, main, run
from shyped.service.auditlog import STATE_NAME, AuditLog, list_log_files


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    with AuditLog(small(tmp_path / "audit", max_file_bytes=2048, keep_files=0)) as log:
        feed(log, 24, flush_every=2)
    return tmp_path / "audit"


def cli(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="shypectl")
    add_audit_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    return run(args, out, err), out.getvalue(), err.getvalue()


def test_verify_intact_directory(logdir: Path) -> None:
    code, out, _ = cli("audit", "--dir", str(logdir), "verify")
    assert code == 0
    last = out.strip().splitlines()[-1]
    assert (last.startswith("OK: ") and "in 3 file(s)" not in last) or "file(s)" in last
    assert "state file ok" in last


def test_verify_names_the_first_broken_record(logdir: Path) -> None:
    path = list_log_files(logdir)[1]
    lines = path.read_bytes().splitlines(keepends=True)
    i = next(i for i, ln in enumerate(lines) if b'"decision":"deny"' in ln)
    rec = json.loads(lines[i])
    lines[i] = lines[i].replace(b'"deny"', b'"permit"')  # a denial rewritten as a permit
    path.write_bytes(b"".join(lines))
    where = f"{path.name}:{i + 1} seq {rec['seq']}"
    code, out, _ = cli("audit", "--dir", str(logdir), "verify")
    assert code == 1
    assert f"BROKEN: first broken record: {where}: " in out
    assert f"error: {where}: unreadable record: hash mismatch" in out
    code, out, _ = cli("audit", "--dir", str(logdir), "verify", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False
    assert doc["first_broken"] == {
        "level": "error",
        "file": path.name,
        "line": i + 1,
        "seq": rec["seq"],
        "message": "unreadable record: hash mismatch: the record's content was changed",
    }


def test_verify_explicit_files_and_state(logdir: Path) -> None:
    files = [str(p) for p in list_log_files(logdir)]
    code, out, _ = cli("audit", "verify", *files[1:])
    assert code == 0 and "earlier files not given" in out
    # Given out of order: the chain breaks where the order is wrong.
    code, out, _ = cli("audit", "verify", files[0], files[2], files[1])
    assert code == 1 and "BROKEN" in out
    # With the state file, a cut at the end is found even for explicit files.
    newest = Path(files[-1])
    newest.write_bytes(b"".join(newest.read_bytes().splitlines(keepends=True)[:-1]))
    assert cli("audit", "verify", *files)[0] == 0
    code, out, _ = cli("audit", "verify", "--state", str(logdir / STATE_NAME), *files)
    assert code == 1 and "truncated" in out


def test_strict_fails_on_documented_losses(logdir: Path) -> None:
    newest = list_log_files(logdir)[-1]
    newest.write_bytes(b"".join(newest.read_bytes().splitlines(keepends=True)[:-1]))
    with AuditLog(small(logdir, max_file_bytes=2048, keep_files=0)) as log:
        feed(log, 1)  # the restart documents the loss
    code, out, _ = cli("audit", "--dir", str(logdir), "verify")
    assert code == 0 and "warning:" in out and "documented loss" in out
    assert cli("audit", "--dir", str(logdir), "verify", "--strict")[0] == 1


def test_verify_missing_directory(tmp_path: Path) -> None:
    code, _, err = cli("audit", "--dir", str(tmp_path / "nope"), "verify")
    assert code == 2 and "no such directory" in err


def test_tail_human_json_and_denied(logdir: Path) -> None:
    code, out, _ = cli("audit", "--dir", str(logdir), "tail", "-n", "4")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4
    assert any(" DENY evtchn [ste] web(3) -> db(5): " in ln for ln in lines)
    code, out, _ = cli("audit", "--dir", str(logdir), "tail", "--denied", "--json", "-n", "3")
    recs = [json.loads(ln) for ln in out.splitlines()]
    assert len(recs) == 3 and all(r["decision"] == "deny" for r in recs)
    assert [r["seq"] for r in recs] == sorted(r["seq"] for r in recs)


def test_tail_follow_prints_new_records_until_stopped(logdir: Path) -> None:
    out = io.StringIO()
    polls = [0]
    log = AuditLog(small(logdir, max_file_bytes=2048, keep_files=0))
    log.open()
    written: list[int] = []

    def between_polls(_interval: float) -> None:  # the writer goes on between two polls
        polls[0] += 1
        written.extend(r.seq for r in feed(log, 4))

    try:
        code = audit_tail(
            follow=True,
            denied_only=True,
            directory=logdir,
            lines=1,
            out=out,
            stop=lambda: polls[0] >= 3,
            sleep=between_polls,
        )
    finally:
        log.close()
    shown = [int(ln.split()[1][1:]) for ln in out.getvalue().splitlines()]
    assert code == 0 and all(" DENY " in ln for ln in out.getvalue().splitlines())
    assert len(shown) == len(set(shown)) and shown == sorted(shown)
    # The backlog's one denial, then every denial written while following (the last poll's
    # batch is written after the loop stopped).
    assert len(shown) == 1 + 2 * 2


def test_verify_function_and_module_entry_point(logdir: Path) -> None:
    out = io.StringIO()
    assert audit_verify(directory=logdir, out=out) == 0 and out.getvalue().startswith("OK")
    assert main(["--dir", str(logdir), "verify", "--json"]) == 0
    done = subprocess.run(
        [sys.executable, "-m", "shyped.cli.auditcli", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "verify" in done.stdout and "tail" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "shyped.cli.auditcli", "--dir", str(logdir), "tail", "-n", "1"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 1


def test_a_global_json_flag_of_the_parent_parser_is_honoured(logdir: Path) -> None:
    parser = argparse.ArgumentParser(prog="shypectl")
    parser.add_argument("--json", action="store_true")  # as shypectl has
    add_audit_commands(parser.add_subparsers(dest="command"))
    for argv in (["--json", "audit", "--dir", str(logdir), "verify"],
                 ["audit", "--dir", str(logdir), "verify", "--json"]):  # fmt: skip
        out = io.StringIO()
        assert run(parser.parse_args(argv), out, io.StringIO()) == 0
        assert json.loads(out.getvalue())["ok"] is True
    out = io.StringIO()
    run(parser.parse_args(["audit", "--dir", str(logdir), "verify"]), out, io.StringIO())
    assert out.getvalue().startswith("OK: ")
