"""``shypectl audit search`` (ausearch-like queries) and the audit commands' directory: from
``--dir``, else the daemon's configuration."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from audit_helpers import small

from shyped.cli import shypectl
from shyped.cli.auditcli import audit_tail
from shyped.cli.auditquery import Query, QueryError, parse_time
from shyped.core.audit import Party
from shyped.policy.decisions import Decision, Hook, Rule
from shyped.service.auditlog import AuditLog

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

WEB = Party("web-a1", 3, "5a0e0000-0000-4000-8000-00000000a001", "bank-a-web")
SHOP = Party("shop-1", 7, "5c1d2e3f-0000-4000-8000-000000000007", "shop")
BANKB = Party("web-b1", 9, None, "bank-b-web")
VCHAN_DENY = Decision(False, Hook.VCHAN, Rule.STE, "'bank-a-web' and 'shop' share no STE type")
ADMIT_DENY = Decision(False, Hook.DOMAIN_ADMIT, Rule.CHINESE_WALL, "'bank-b-web' may not start")
ADMIT = Decision(True, Hook.DOMAIN_ADMIT, Rule.CHINESE_WALL, "none blocked")


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    """Records an hour apart from T0: log-start, admit web-a1, deny vchan web-a1->shop-1,
    deny web-b1, relabel shop-1, policy-load."""
    times = iter([T0 + timedelta(hours=i) for i in range(10)])
    directory = tmp_path / "audit"
    with AuditLog(small(directory), clock=lambda: next(times).timestamp()) as log:
        log.record_decision(ADMIT, subject=WEB, policy_sha256="ab" * 32, mode="enforcing")
        log.record_decision(
            VCHAN_DENY, subject=WEB, obj=SHOP, policy_sha256="ab" * 32, mode="enforcing"
        )
        log.record_decision(ADMIT_DENY, subject=BANKB, policy_sha256="ab" * 32, mode="enforcing")
        log.record_event("relabel", domid=7, name="shop-1", old="shop", new="bank-a-web")
        log.record_event("policy-load", name="example.hosting", version="1.1")
        log.flush()
    return directory


def search(logdir: Path, *args: str) -> tuple[int, list[int], str]:
    """(exit status, seqs printed, stderr) of ``shypectl audit --dir D search ARGS --json``."""
    out, err = io.StringIO(), io.StringIO()
    code = shypectl.run(["audit", "--dir", str(logdir), "search", *args, "--json"], out, err)
    return code, [json.loads(line)["seq"] for line in out.getvalue().splitlines()], err.getvalue()


def test_search_by_decision_domain_label_hook_kind(logdir: Path) -> None:
    assert search(logdir, "--decision", "deny")[:2] == (0, [2, 3])
    assert search(logdir, "--decision", "permit")[:2] == (0, [1])
    assert search(logdir, "--domain", "shop-1")[:2] == (0, [2, 4])  # object of 2, relabel 4
    assert search(logdir, "--domain", "3")[:2] == (0, [1, 2])  # by domid
    assert search(logdir, "--domain", WEB.uuid or "")[:2] == (0, [1, 2])  # by uuid
    assert search(logdir, "--label", "ACM:example.hosting:bank-a-web")[:2] == (0, [1, 2, 4])
    assert search(logdir, "--hook", "vchan")[:2] == (0, [2])
    assert search(logdir, "-m", "policy-load")[:2] == (0, [5])
    assert search(logdir, "--decision", "deny", "--domain", "web-b1", "--domain", "shop-1")[:2] == (
        0,
        [2, 3],
    )
    assert search(logdir, "--decision", "deny", "-n", "1")[:2] == (0, [3])
    code, seqs, err = search(logdir, "--domain", "nobody")
    assert (code, seqs, err) == (1, [], "<no matches>\n")


def test_search_by_time_range(logdir: Path) -> None:
    # record n was written at T0 + n hours (log-start is 0)
    assert search(logdir, "--start", "2026-12-01T11:00Z")[1] == [2, 3, 4, 5]
    assert search(logdir, "--start", "2026-12-01", "10:30Z", "--end", "2026-12-01T12:00Z")[1] == [
        2,
        3,
    ]
    assert search(logdir, "-ts", "2026-11-30", "-te", "2026-11-30")[0] == 1
    code, _, err = search(logdir, "--start", "soon")
    assert code == 2 and "cannot read the time 'soon'" in err


def test_search_leaves_the_chain_intact(logdir: Path) -> None:
    before = {p.name: p.read_bytes() for p in logdir.iterdir()}
    assert search(logdir, "--decision", "deny")[0] == 0
    assert {p.name: p.read_bytes() for p in logdir.iterdir()} == before
    out = io.StringIO()
    assert shypectl.run(["audit", "--dir", str(logdir), "verify"], out, io.StringIO()) == 0


def test_human_output_is_tails(logdir: Path) -> None:
    out = io.StringIO()
    args = ["audit", "search", "--dir", str(logdir), "--hook", "vchan"]  # --dir after too
    assert shypectl.run(args, out, io.StringIO()) == 0
    (line,) = out.getvalue().splitlines()
    assert line.startswith("2026-12-01T11:00:00") and " #2 DENY vchan [ste] web-a1(3" in line


NOW = datetime(2026, 12, 9, 15, 42, 7, tzinfo=timezone(timedelta(hours=1)))  # a Wednesday


@pytest.mark.parametrize(
    ("words", "end", "expected"),
    [
        (["now"], False, NOW),
        (["recent"], False, NOW - timedelta(minutes=10)),
        (["this-hour"], False, NOW.replace(minute=0, second=0)),
        (["today"], False, NOW.replace(hour=0, minute=0, second=0)),
        (["yesterday"], False, NOW.replace(day=8, hour=0, minute=0, second=0)),
        (["this-week"], False, NOW.replace(day=7, hour=0, minute=0, second=0)),
        (["week-ago"], False, NOW.replace(day=2, hour=0, minute=0, second=0)),
        (["this-month"], False, NOW.replace(day=1, hour=0, minute=0, second=0)),
        (["this-year"], False, NOW.replace(month=1, day=1, hour=0, minute=0, second=0)),
        (["9:30"], False, NOW.replace(hour=9, minute=30, second=0)),
        (["2026-12-07"], False, datetime(2026, 12, 7, tzinfo=NOW.tzinfo)),
        (["2026-12-07"], True, datetime(2026, 12, 7, 23, 59, 59, 999999, tzinfo=NOW.tzinfo)),
        (["2026-12-07", "10:00:05"], False, datetime(2026, 12, 7, 10, 0, 5, tzinfo=NOW.tzinfo)),
        (["2026-12-07T10:00Z"], False, datetime(2026, 12, 7, 10, 0, tzinfo=UTC)),
        (
            ["2026-12-07T10:00+05:30"],
            False,
            datetime(2026, 12, 7, 10, 0, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        ),
    ],
)
def test_time_expressions(words: list[str], end: bool, expected: datetime) -> None:
    assert parse_time(words, NOW, end=end) == expected


@pytest.mark.parametrize(
    "words", [["tomorrow"], ["2026-13-01"], ["25:00"], ["a", "b", "c"], ["9:30", "10:30"]]
)
def test_bad_time_expressions(words: list[str]) -> None:
    with pytest.raises(QueryError):
        parse_time(words, NOW)


def test_boot_needs_the_boot_time() -> None:
    boot = NOW - timedelta(hours=3)
    assert parse_time(["boot"], NOW, boot=boot) == boot
    with pytest.raises(QueryError, match="boot time"):
        parse_time(["boot"], NOW)
    assert Query().start is None


def test_verify_and_tail_default_to_the_configured_directory(logdir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "shyped.toml"
    cfg.write_text(f'[policy]\npath = "p.toml"\n[audit]\ndirectory = "{logdir}"\n')
    py = [sys.executable, "-m", "shyped.cli.shypectl", "audit"]
    r = subprocess.run([*py, "--config", str(cfg), "verify"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("OK: 6 record(s)"), r.stderr
    r = subprocess.run(
        [*py, "tail", "-n", "1"], capture_output=True, text=True, env={"SHYPED_CONFIG": str(cfg)}
    )
    assert r.returncode == 0 and " #5 policy-load " in r.stdout, r.stderr
    # a configuration named explicitly must load
    r = subprocess.run([*py, "--config", str(tmp_path / "none.toml"), "verify"], text=True,
                       capture_output=True)  # fmt: skip
    assert r.returncode == 2 and "cannot read configuration" in r.stderr and "--dir" in r.stderr
    assert "Traceback" not in r.stderr


def test_tail_takes_the_same_filters_and_follows_with_them(logdir: Path) -> None:
    out = io.StringIO()
    args = ["audit", "--dir", str(logdir), "tail", "--domain", "web-a1", "--json", "-n", "1"]
    assert shypectl.run(args, out, io.StringIO()) == 0
    assert [json.loads(line)["seq"] for line in out.getvalue().splitlines()] == [2]

    polls = []

    def sleep(_: float) -> None:  # between two polls: shop-1 is denied again, web-b1 too
        if not polls:
            with AuditLog(small(logdir)) as log:
                for subject in (SHOP, BANKB):
                    log.record_decision(
                        ADMIT_DENY, subject=subject, policy_sha256="ab" * 32, mode="enforcing"
                    )
        polls.append(1)

    out = io.StringIO()
    code = audit_tail(
        follow=True,
        json_output=True,
        directory=logdir,
        lines=5,
        query=Query(domains=("shop-1",)),
        out=out,
        stop=lambda: len(polls) >= 2,
        sleep=sleep,
    )
    seqs = [json.loads(line)["seq"] for line in out.getvalue().splitlines()]
    names = [
        json.loads(line).get("subject", {}).get("name") for line in out.getvalue().splitlines()
    ]
    assert code == 0 and seqs[:2] == [2, 4] and len(seqs) == 3 and names[2] == "shop-1"
