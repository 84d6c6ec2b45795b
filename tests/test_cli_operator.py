"""What an operator sees from the real daemon (a child process on a sandbox host): the example
guest cfgs of conf/ against the example policy, ``shypectl list``'s xl columns, a label typo,
journald priorities on the daemon's stderr, the JSON log format and USER_AVC denials."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from control_daemon_helpers import ROOT, Host, sandbox_host
from process_helpers import SHYPED, wait_until

from shyped.cli import shypectl
from shyped.control import views
from shyped.core.hostfacts import Domain, DomainState
from shyped.sandbox.xenstored import SandboxXenstored

CONF = ROOT / "conf"


@pytest.fixture
def host(xenstored: SandboxXenstored) -> Iterator[Host]:
    with sandbox_host(xenstored) as h:
        yield h


def kmsg_mark() -> int | None:
    """An fd on /dev/kmsg positioned at its end (None where it cannot be read)."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    os.lseek(fd, 0, os.SEEK_END)
    return fd


def kmsg_since(fd: int) -> list[str]:
    out = []
    while True:
        try:
            out.append(os.read(fd, 8192).decode(errors="replace"))
        except BlockingIOError:
            return out
        except OSError:  # EPIPE: overwritten records; go on reading
            continue


def kmsg_decoy() -> None:
    """Another daemon's denial in the shared kernel log (other sessions' daemons write them
    there at any time): the test must tell its own record from it."""
    with contextlib.suppress(OSError):
        fd = os.open("/dev/kmsg", os.O_WRONLY)
        try:
            os.write(
                fd,
                b"audit: type=1107 audit(0.0:0): pid=1 uid=0 msg='avc:  denied  { domain } for "
                b"comm=shyped scontext=ACM:example.hosting:bank-a-web tclass=shyped sname=web-b1 "
                b"rule=ste permissive=1'",
            )
        finally:
            os.close(fd)


def own_avcs(records: list[str], pid: int, perm: str) -> list[str]:
    """The USER_AVC records of `perm` sent by process `pid` (the kernel stamps the sender)."""
    mine = re.compile(rf"type=1107 audit\([^)]*\): pid={pid} ")
    return [m for m in records if mine.search(m) and f"avc:  denied  {{ {perm} }}" in m]


def test_example_cfgs_list_columns_typos_journald_priorities_and_user_avc(host: Host) -> None:
    """The conf/*.cfg examples dry-run as their comments say against conf/'s policy; the
    daemon's stderr, being the "journal", carries sd-daemon priorities; a denial goes to the
    kernel's audit log as USER_AVC (root here)."""
    shutil.copy(CONF / "policies" / "hosting.toml", host.policy)
    shutil.copy(CONF / "labels.json", host.labels)
    log = host.directory / "daemon1.log"  # Host.start names it after the count: 1 (itself)
    log.touch()
    st = log.stat()
    kmsg = kmsg_mark()
    kmsg_decoy()
    pid = host.start(env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}).proc.pid

    # every example is permitted on an empty host (cfg comments)
    for name in ("web-a1", "batch-a1", "web-b1", "shop-1"):
        r = host.ctl("dry-run", str(CONF / f"{name}.cfg"))
        assert r.returncode == 0, (name, r.stdout, r.stderr)
        assert r.stdout.splitlines()[-1] == "PERMITTED"
    r = host.shype_xl("create", str(CONF / "web-a1.cfg"))
    assert r.returncode == 0, r.stderr
    # ... and web-b1 is refused by the Chinese Wall once Bank A runs
    r = host.ctl("dry-run", str(CONF / "web-b1.cfg"))
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines()[-1] == "DENIED" and "Chinese Wall" in r.stdout
    assert host.ctl("dry-run", str(CONF / "shop-1.cfg")).returncode == 0

    # xl list -Z's columns, with what the daemon knows of the domain
    r = host.ctl("list", "web-a1")
    assert r.returncode == 0, r.stderr
    head, row = r.stdout.splitlines()
    assert head.split() == ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)", "Security", "Label"]
    name, domid, mem, vcpus, state, cpu, label = row.split()
    assert (name, mem, vcpus, state, cpu) == ("web-a1", "512", "1", "admitted", "-")
    assert label == "ACM:example.hosting:bank-a-web" and int(domid) == host.domid("web-a1")
    assert [line.split()[0] for line in host.ctl("list").stdout.splitlines()[1:]] == [
        "Domain-0",
        "web-a1",
    ]

    # a label typo: its own exit status and a suggestion, not a policy denial
    typo = host.directory / "typo.cfg"
    typo.write_text((CONF / "shop-1.cfg").read_text().replace(":shop", ":sohp"))
    r = host.ctl("dry-run", str(typo))
    assert r.returncode == 6, (r.stdout, r.stderr)
    assert "unknown label 'sohp', did you mean 'shop'?" in r.stderr and "DENIED" not in r.stdout
    r = host.shype_xl("create", str(typo))
    assert r.returncode == 6 and "did you mean 'shop'?" in r.stderr
    assert "shop-1" not in host.xl_list()  # nothing created

    # a domain created behind shype-xl's back and denied: a warning for journald
    assert host.xl("create", str(CONF / "web-b1.cfg")).returncode == 0
    wait_until(lambda: "decision: deny domain" in host.log(), what="the denial")
    # the veto carried out and the domain gone before anything else (and before the stop)
    wait_until(lambda: "domain gone: web-b1" in host.log(), what="the veto")
    wait_until(lambda: re.search(r"enforce: destroy domain \d+ done", host.log()), what="done")
    lines = host.log().splitlines()
    deny = next(line for line in lines if "decision: deny domain" in line)
    assert deny.startswith("<4>[shyped.daemon#warn] decision: deny domain ")
    assert any(line.startswith("<6>[shyped.daemon#info] decision: permit ") for line in lines)
    assert all(line[:3] in {"<2>", "<3>", "<4>", "<5>", "<6>", "<7>"} for line in lines)

    if kmsg is not None and shutil.which("auditd") is None:
        # no auditd here: the kernel writes audit records to its own log
        seen: list[str] = []

        def mirrored() -> bool:
            seen.extend(kmsg_since(kmsg))
            return bool(own_avcs(seen, pid, "domain")) or (
                "not mirrored to the Linux audit log" in host.log()
            )

        wait_until(mirrored, what="USER_AVC")
        os.close(kmsg)
        if "not mirrored to the Linux audit log" not in host.log():
            (avc,) = own_avcs(seen, pid, "domain")
            assert "type=1107" in avc and "tclass=shyped" in avc
            assert "scontext=ACM:example.hosting:bank-b-web" in avc and "sname=web-b1" in avc
            assert "rule=chinese-wall" in avc and "permissive=0" in avc


def test_json_log_format(host: Host) -> None:
    """``[log] format = "json"``: every line of the daemon's stderr is one JSON object."""
    host.extra = '[log]\nformat = "json"\nuser_avc = false\n'
    daemon = host.start(ready=False)
    wait_until(lambda: '"message": "ready: ' in daemon.text() or daemon.proc.poll() is not None)
    assert host.xl("create", str(host.cfg("ghost-1"))).returncode == 0  # unlabelled: denied
    wait_until(lambda: "decision: deny domain" in daemon.text(), what="the denial")
    wait_until(lambda: "domain gone: ghost-1" in daemon.text(), what="the veto")
    wait_until(lambda: re.search(r"enforce: destroy domain \d+ done", daemon.text()), what="done")
    docs = [json.loads(line) for line in daemon.text().splitlines()]
    deny = next(d for d in docs if d["message"].startswith("decision: deny domain"))
    assert (deny["level"], deny["priority"], deny["namespace"]) == ("warn", 4, "shyped.daemon")
    assert deny["time"].endswith("+00:00")
    assert {d["level"] for d in docs} <= {"info", "warn", "error", "critical"}


def test_log_format_flag_and_config_are_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "shyped.toml"
    cfg.write_text(
        f'[policy]\npath = "{CONF / "policies" / "hosting.toml"}"\n[log]\nformat = "xml"\n'
    )
    r = subprocess.run([*SHYPED, "--config", str(cfg), "check"], capture_output=True, text=True)
    assert r.returncode == 2 and "log.format must be one of 'text', 'json'" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([*SHYPED, "--log-format", "xml"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'xml'" in r.stderr


def test_list_row_from_the_host_model() -> None:
    """Mem from the memory target, VCPUs online, CPU seconds from the metrics' xl poll."""
    dom = Domain(3, "5a0e0000-0000-4000-8000-00000000a001", "web-a1", DomainState.ADMITTED)
    dom.memory_target_kib, dom.vcpus, dom.vcpus_online = 524288, 2, 1
    info = views.domain_info(dom, "ACM:example.hosting:bank-a-web", {3: 12.34, 4: 1.0})
    assert (info.memory_mib, info.vcpus, info.cpu_seconds, info.state) == (
        512,
        1,
        12.34,
        "admitted",
    )
    row = shypectl._list_row(info).split()
    assert row == ["web-a1", "3", "512", "1", "admitted", "12.3", "ACM:example.hosting:bank-a-web"]
    bare = views.domain_info(Domain(5, None, None), None)
    assert shypectl._list_row(bare).split() == ["?", "5", "-", "-", "seen", "-", "-"]
