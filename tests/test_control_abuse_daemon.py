"""Local abuse of the REAL daemon's control socket (``shyped --config …`` on a sandbox host) by
real second users (`peercred_helpers`): refused-request floods against the audit trail,
pathological policies from the read group, non-UUIDs given to `wait_admission`."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest
from control_daemon_helpers import PY, Host, image, sandbox_host
from control_daemon_helpers import audit_records as records
from peercred_helpers import Accounts, code, needs_users, run_as, system_accounts

from shyped.sandbox.xenstored import SandboxXenstored

pytestmark = needs_users


@pytest.fixture(scope="module")
def accounts() -> Iterator[Accounts]:
    with system_accounts() as acc:
        yield acc


@pytest.fixture
def host(xenstored: SandboxXenstored, accounts: Accounts) -> Iterator[Host]:
    """A sandbox host whose control socket the test users can reach, with a small audit trail
    (2 files of 16 KiB: what 8 MiB x 16 is to a long flood)."""
    with sandbox_host(xenstored) as h:
        os.chmod(h.directory, 0o755)
        h.extra = (
            f'read_group = "{accounts.read_group}"\nadmin_group = "{accounts.admin_group}"\n'
            f'[audit]\ndirectory = "{h.directory / "audit"}"\n'
            "max_file_bytes = 16384\nkeep_files = 2\n"
        )
        yield h


#: argv[2] setenforce requests on each of argv[3] connections, answers read; the codes seen.
FLOOD = r"""
import json, socket, sys
path, n, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
line = b'{"version": 1, "op": "setenforce", "args": {"mode": "permissive"}}\n'
codes = set()
for _ in range(conns):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    f = s.makefile("rb")
    for _ in range(n):
        s.sendall(line)
        codes.add(json.loads(f.readline())["error"]["code"])
    s.close()
print(json.dumps(sorted(codes)), flush=True)
"""


def test_refused_flood_cannot_purge_the_audit_trail(host: Host, accounts: Accounts) -> None:
    """Finding 1 (issue 11): every refused admin request of an outsider was an audit record;
    retention then deleted every decision record. Now one record per uid per interval."""
    host.start()
    cfg = host.cfg("web-a1", "bank-a-web", disks=(image("web-a1"),))
    assert host.shype_xl("create", str(cfg)).returncode == 0
    decided = [r for r in records(host) if r["kind"] == "decision"]
    assert decided, records(host)
    flood = run_as(accounts.outsider, FLOOD, str(host.socket), "1500", "2")
    assert flood == [["permission-denied"]]
    assert host.ctl("status").returncode == 0  # the daemon wrote what it had to
    after = records(host)
    assert [r for r in after if r["kind"] == "decision"][: len(decided)] == decided
    refused = [r for r in after if r["kind"] == "control" and r.get("allowed") is False]
    assert len(refused) == 1, refused
    verify = subprocess.run(
        [PY, "-m", "shyped.cli.auditcli", "--dir", str(host.directory / "audit"), "verify"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


#: Sends argv[2] bombs of ~31,000 dotted keys (62 KB) and one of 5,000 nested arrays, each as
#: policy_check on its own connection, then after 0.5 s a ping; prints the answers in the
#: order they arrive.
BOMBS = r"""
import json, selectors, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
texts = ["a." * 31000 + "b = 1"] * n + ["x = " + "[" * 5000 + "]" * 5000]
sel = selectors.DefaultSelector()
def ask(name, doc):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(json.dumps(doc).encode() + b"\n")
    sel.register(s, selectors.EVENT_READ, [name, b""])
for i, text in enumerate(texts):
    ask(f"bomb{i}", {"version": 1, "op": "policy_check", "args": {"text": text}})
time.sleep(0.5)
ask("ping", {"version": 1, "op": "ping"})
left = len(texts) + 1
deadline = time.monotonic() + 300
while left and time.monotonic() < deadline:
    for key, _ in sel.select(timeout=1):
        data = key.fileobj.recv(65536)
        key.data[1] += data
        if not data or data.endswith(b"\n"):
            doc = json.loads(key.data[1]) if data else {"eof": True}
            print(json.dumps({"name": key.data[0], "answer": doc}), flush=True)
            sel.unregister(key.fileobj)
            left -= 1
"""


def test_policy_bombs_do_not_stall_the_daemon(host: Host, accounts: Accounts) -> None:
    """Finding 2 (issue 20): a read-group member's policy_check of a 62 KB text of dotted
    keys held the reactor ~14 s each (root's ping waited minutes); 5,000 nested arrays were
    answered `internal`. Now the parse runs in a limited worker process: the ping is answered
    first, and every bomb gets a clean `policy-invalid`."""
    host.start()
    answers = run_as(accounts.reader, BOMBS, str(host.socket), "3", timeout=600)
    order = [a["name"] for a in answers]
    assert order[0] == "ping", order
    assert answers[0]["answer"]["ok"] is True
    by_name = {a["name"]: a["answer"] for a in answers}
    assert len(by_name) == 5
    assert [code(by_name[f"bomb{i}"]) for i in range(4)] == ["policy-invalid"] * 4
    # the problem is named (in the message or, as every policy problem, in details.problems)
    assert "nested too deeply" in json.dumps(by_name["bomb3"]["error"])
    assert "limit" in by_name["bomb0"]["error"]["message"]
    assert "Traceback" not in host.log()


WAIT = r"""
import json, socket, sys
path = sys.argv[1]
for uuid in sys.argv[2:]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    doc = {"version": 1, "op": "wait_admission", "args": {"uuid": uuid, "timeout": 3}}
    s.sendall(json.dumps(doc).encode() + b"\n")
    print(s.makefile("rb").readline().decode().strip(), flush=True)
    s.close()
"""


def test_wait_admission_refuses_what_is_not_a_uuid(host: Host, accounts: Accounts) -> None:
    """Finding 14 (issue 11): "" and "../../etc/passwd" were taken as UUIDs and waited on."""
    host.start()
    bad = ["", "../../etc/passwd", "{5a0e1c9e-2a4d-4c55-9e0e-000000000001}"]
    answers = run_as(accounts.reader, WAIT, str(host.socket), *bad)
    assert [code(a) for a in answers] == ["invalid-argument"] * 3
    assert all("not a domain UUID" in a["error"]["message"] for a in answers)
    # a well-formed UUID of no domain still waits, as shype-xl needs
    good = run_as(accounts.reader, WAIT, str(host.socket), "5a0e1c9e-2a4d-4c55-9e0e-0000000000ff")
    assert [code(a) for a in good] == ["admission-timeout"]
