"""The daemon's log lines (journald priorities, JSON) and the USER_AVC mirror: formatting is
pure; the netlink audit socket is tried for real where the kernel allows it."""

from __future__ import annotations

import errno
import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from user_helpers import local_user, needs_users, setpriv, skip_unless_checkout_readable

from shyped.cli.logs import LineObserver, format_json, stream_is_journal
from shyped.core.audit import Party
from shyped.core.hostfacts import NeedsDecision, VchanKey
from shyped.core.modes import Mode
from shyped.core.outcome import Outcome
from shyped.policy.decisions import Decision, Hook, Rule
from shyped.service import linuxaudit
from shyped.service.linuxaudit import UserAvcMirror, ack_error, format_user_avc, netlink_message

ROOT = Path(__file__).resolve().parents[1]


def event(level: LogLevel, text: str, **fields: object) -> dict[str, object]:
    return {
        "log_level": level,
        "log_namespace": "shyped.daemon",
        "log_format": "{line}",
        "line": text,
        "log_time": 1796600000.25,
        **fields,
    }


def test_journal_lines_carry_sd_daemon_priorities() -> None:
    out = io.StringIO()
    observe = LineObserver(out, journal=True)
    observe(event(LogLevel.warn, "decision: deny domain 3"))
    observe(event(LogLevel.info, "decision: permit domain 4"))
    observe(event(LogLevel.critical, "AUDIT UNAVAILABLE"))
    try:
        raise ValueError("boom")
    except ValueError:
        observe(event(LogLevel.error, "failed", log_failure=Failure()))
    lines = out.getvalue().splitlines()
    assert lines[:3] == [
        "<4>[shyped.daemon#warn] decision: deny domain 3",
        "<6>[shyped.daemon#info] decision: permit domain 4",
        "<2>[shyped.daemon#critical] AUDIT UNAVAILABLE",
    ]
    assert lines[3] == "<3>[shyped.daemon#error] failed"
    assert len(lines) > 5 and all(line.startswith("<3>") for line in lines[3:])  # traceback


def test_plain_lines_without_the_journal() -> None:
    out = io.StringIO()
    LineObserver(out)(event(LogLevel.warn, "decision: deny domain 3"))
    (line,) = out.getvalue().splitlines()
    assert line.endswith(" [shyped.daemon#warn] decision: deny domain 3")
    assert line[:4].isdigit()  # the timestamp first


def test_journal_stream_is_recognised_by_device_and_inode(tmp_path: Path) -> None:
    with (tmp_path / "a").open("w") as a, (tmp_path / "b").open("w") as b:
        st = os.fstat(a.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert stream_is_journal(a, env)
        assert not stream_is_journal(b, env)  # stderr redirected elsewhere under systemd
        assert not stream_is_journal(a, {})
        assert not stream_is_journal(a, {"JOURNAL_STREAM": "garbage"})
        assert not stream_is_journal(io.StringIO(), env)


def test_json_lines() -> None:
    doc = json.loads(format_json(event(LogLevel.warn, "decision: deny vchan", domid=3)))
    assert doc == {
        "time": "2026-12-06T23:33:20.250000+00:00",
        "level": "warn",
        "priority": 4,
        "namespace": "shyped.daemon",
        "message": "decision: deny vchan",
        "line": "decision: deny vchan",
        "domid": 3,
    }


def outcome(name: str = "bank-b-web-1", mode: Mode = Mode.ENFORCING) -> Outcome:
    d = Decision(False, Hook.VCHAN, Rule.STE, "'bank-a-web' and 'shop' share no STE type")
    return Outcome(
        need=NeedsDecision("vchan", VchanKey(3, "data/vchan/7/1"), 3, peers=(7,)),
        what="vchan /local/domain/3/data/vchan/7/1",
        decision=d,
        checks=(d,),
        subject=Party(name, 3, None, "bank-a-web"),
        peer=Party("shop-1", 7, None, "shop"),
        mode=mode,
        policy="example.hosting",
    )


def test_user_avc_text() -> None:
    text = format_user_avc(outcome())
    assert text == (
        "avc:  denied  { vchan } for comm=shyped scontext=ACM:example.hosting:bank-a-web "
        "tcontext=ACM:example.hosting:shop tclass=shyped sname=bank-b-web-1 sdomid=3 "
        'tname=shop-1 tdomid=7 hook=vchan rule=ste reason="\\u0027bank-a-web\\u0027 and '
        '\\u0027shop\\u0027 share no STE type" permissive=0'
    )
    assert "permissive=1" in format_user_avc(outcome(mode=Mode.PERMISSIVE))


def test_user_avc_text_cannot_be_forged_by_a_domain_name() -> None:
    text = format_user_avc(outcome("x' tcontext=ACM:p:dom0 permissive=1 '\nnext"))
    assert "'" not in text and "\n" not in text  # cannot end the kernel's msg='…'
    fields = [w.split("=", 1) for w in shlex.split(text.split(" for ", 1)[1])]
    keys = [k for k, _ in fields]
    assert len(keys) == len(set(keys))
    values = dict(fields)
    assert values["tcontext"] == "ACM:example.hosting:shop" and values["permissive"] == "0"
    assert values["sname"] == "x\\u0027 tcontext=ACM:p:dom0 permissive=1 \\u0027\\nnext"
    assert len(format_user_avc(outcome("n" * 10_000))) <= linuxaudit.MAX_TEXT


def test_netlink_framing_and_acknowledgement() -> None:
    msg = netlink_message("avc:  denied  { x }", 7)
    length, kind, flags, seq, pid = linuxaudit._HEADER.unpack_from(msg)
    assert (length, kind, flags, seq, pid) == (len(msg), 1107, 5, 7, 0)
    assert msg[16:].rstrip(b"\0") == b"avc:  denied  { x }" and len(msg) % 4 == 0
    ack = linuxaudit._HEADER.pack(36, 2, 0, 7, 0) + (-errno.EPERM).to_bytes(
        4, "little", signed=True
    )
    assert ack_error(ack + b"\0" * 16, 7) == errno.EPERM
    assert ack_error(ack + b"\0" * 16, 8) is None


class FakeSocket:
    def __init__(self, answer: int | None = 0, fail: OSError | None = None) -> None:
        self.sent: list[bytes] = []
        self.answer = answer
        self.fail = fail

    def sendto(self, data: bytes, address: object) -> int:
        if self.fail is not None:
            raise self.fail
        self.sent.append(data)
        return len(data)

    def recv(self, size: int, flags: int = 0) -> bytes:
        if self.answer is None:
            raise BlockingIOError
        seq = linuxaudit._HEADER.unpack_from(self.sent[-1])[3]
        return (
            linuxaudit._HEADER.pack(36, 2, 0, seq, 0)
            + (-self.answer).to_bytes(4, "little", signed=True)
            + b"\0" * 16
        )

    def close(self) -> None:
        pass


def test_mirror_turns_itself_off_once_and_rate_limits() -> None:
    sock = FakeSocket(answer=errno.EPERM)
    mirror = UserAvcMirror(opener=lambda: sock)
    mirror(outcome())
    assert not mirror.enabled and "needs CAP_AUDIT_WRITE" in (mirror.error or "")
    mirror(outcome())
    assert len(sock.sent) == 1  # not tried again
    missing = UserAvcMirror(
        opener=lambda: (_ for _ in ()).throw(OSError(errno.EPROTONOSUPPORT, ""))
    )
    missing(outcome())
    assert not missing.enabled and missing.error == os.strerror(errno.EPROTONOSUPPORT)

    now = [0.0]
    ok = FakeSocket(answer=0)
    limited = UserAvcMirror(opener=lambda: ok, burst=3, interval=10, clock=lambda: now[0])
    for _ in range(5):
        limited(outcome())
    assert (limited.sent, limited.suppressed) == (3, 2)
    now[0] = 10.0
    limited(outcome())
    assert (limited.sent, limited.suppressed, limited.enabled) == (4, 0, True)


PROBE = """
import sys
from shyped.service.linuxaudit import UserAvcMirror
m = UserAvcMirror()
print(m.send(sys.argv[1]), m.error)
"""


def test_the_kernel_audit_socket_here() -> None:
    """As root (CAP_AUDIT_WRITE) the kernel takes a USER_AVC; without the capability it refuses
    and the mirror says why. (Where the kernel has no audit netlink, both say so.)"""
    probe = "avc:  denied  { probe } for  comm=shyped-test"
    r = subprocess.run(
        [sys.executable, "-c", PROBE, probe], capture_output=True, text=True, cwd=ROOT
    )
    sent, _, why = r.stdout.strip().partition(" ")
    if sent == "False" and "Protocol not supported" in why:
        pytest.skip(f"no kernel audit netlink here: {why}")
    assert (sent, why) == ("True", "None"), r.stdout + r.stderr


@needs_users
def test_the_kernel_refuses_a_user_without_cap_audit_write() -> None:
    with local_user("shya") as user:
        skip_unless_checkout_readable(user, sys.executable, "shyped.service.linuxaudit")
        r = subprocess.run([*setpriv(user), sys.executable, "-c", PROBE, "avc:  denied  { probe }"],
                           capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert r.stdout.startswith("False the kernel refused it: Operation not permitted"), r.stderr
