"""Local abuse of the control socket by users outside the shyped groups (real second users,
`peercred_helpers`), against the real server in front of the test backend: answers left
unread, connection slots taken by many uids, floods of refused requests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytest_twisted
from control_helpers import ModelBackend, aserving, in_thread
from peercred_helpers import (
    SETENFORCE,
    Account,
    Accounts,
    as_user,
    code,
    groups_config,
    needs_users,
    reachable_backend,
    run_as,
    spawn_as,
    system_accounts,
)

from shyped.control.server import ServerLimits

pytestmark = needs_users

LIST = '{"version": 1, "op": "list"}'


@pytest.fixture(scope="module")
def accounts() -> Iterator[Accounts]:
    with system_accounts(more_outsiders=7) as acc:
        yield acc


@pytest.fixture
def backend() -> Iterator[ModelBackend]:
    with reachable_backend("ctla") as b:
        yield b


config = groups_config


#: Sends `x\n` lines (up to argv[2] bytes) and never reads an answer; prints how many bytes the
#: daemon took before sending blocked for 3 s, then whether the daemon cut it off (argv[3] s).
NO_READER = r"""
import json, socket, sys, time
path, total, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
s.settimeout(3)
chunk = b"x\n" * 2048
sent = 0
cut = False
while sent < total:
    try:
        sent += s.send(chunk)
    except (socket.timeout, BlockingIOError):
        break
    except (BrokenPipeError, ConnectionResetError):
        cut = True
        break
print(json.dumps({"sent": sent}), flush=True)
s.settimeout(1)
deadline = time.monotonic() + wait
while time.monotonic() < deadline and not cut:
    try:
        s.send(b"x\n")
    except (BrokenPipeError, ConnectionResetError):
        cut = True
    except (socket.timeout, BlockingIOError):
        pass
print(json.dumps({"cut": cut}), flush=True)
"""


@pytest_twisted.ensureDeferred
async def test_answers_left_unread_stop_the_reading(
    backend: ModelBackend, accounts: Accounts
) -> None:
    """Finding 2 (issue 11): `x\\n` lines with the answers never read made the daemon's memory
    grow without bound (it read every line and queued every answer). Now it stops reading a
    peer whose answers pile up, and cuts it off after `stall_timeout`."""
    total = 1536 * 1024
    limits = ServerLimits(stall_timeout=6.0)
    async with aserving(
        backend, backend.directory, config=config(backend, accounts), limits=limits
    ) as server:
        sent, cut = await in_thread(
            run_as, accounts.outsider, NO_READER, str(server.path), str(total), "20"
        )
        root = await in_thread(as_user, Account("root", 0, 0), server.path, LIST)
    # the kernel's socket buffers (~200 KiB each way) plus one answer buffer, not the flood
    assert sent["sent"] < total // 2, sent
    assert cut["cut"] is True
    assert root[0]["ok"] is True


#: Opens argv[2] connections, asks `ping` on each, prints the codes, holds them until stdin
#: closes.
HOLDER = r"""
import json, socket, sys
path, n = sys.argv[1], int(sys.argv[2])
socks, codes = [], []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    try:
        s.sendall(b'{"version": 1, "op": "ping"}\n')
        buf = b""
        while not buf.endswith(b"\n"):
            c = s.recv(65536)
            if not c:
                break
            buf += c
        doc = json.loads(buf) if buf else {}
    except (BrokenPipeError, ConnectionResetError):
        doc = {}
    codes.append(None if doc.get("ok") else doc.get("error", {}).get("code", "eof"))
    socks.append(s)
print(json.dumps(codes), flush=True)
sys.stdin.read()
"""


@pytest_twisted.ensureDeferred
async def test_outsiders_cannot_lock_out_the_read_group(
    backend: ModelBackend, accounts: Accounts
) -> None:
    """Finding 12 (issue 11): 8 foreign uids x 8 connections took every unprivileged slot and
    the read group's `list` got `busy`. Now outsiders have their own few slots."""
    outsiders = (accounts.outsider, *accounts.outsiders)
    assert len(outsiders) == 8
    async with aserving(backend, backend.directory, config=config(backend, accounts)) as server:
        holders = [spawn_as(acc, HOLDER, str(server.path), "8") for acc in outsiders]
        try:
            held = [await in_thread(h.stdout.readline) for h in holders if h.stdout]
            answers = await in_thread(as_user, accounts.reader, server.path, LIST, LIST)
        finally:
            for h in holders:
                h.communicate("", timeout=30)
    assert [code(a) for a in answers] == [None, None]
    refused = sum(line.count("busy") for line in held)
    assert refused > 0  # the outsiders did try to take more than their share


#: Sends argv[2] setenforce requests on one connection, reading each answer; prints the codes
#: seen (a set) and how many were answered.
FLOOD = r"""
import json, socket, sys
path, n = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
f = s.makefile("rb")
line = b'{"version": 1, "op": "setenforce", "args": {"mode": "permissive"}}\n'
codes = set()
for _ in range(n):
    s.sendall(line)
    codes.add(json.loads(f.readline())["error"]["code"])
print(json.dumps({"codes": sorted(codes), "answered": n}), flush=True)
"""


@pytest_twisted.ensureDeferred
async def test_refused_requests_are_summarised(backend: ModelBackend, accounts: Accounts) -> None:
    """Finding 1 (issue 11), at the server: every refused admin request of an outsider was an
    audit record. Now the first is, the rest are one summary with their count per interval."""
    limits = ServerLimits(refusal_interval=600.0)
    async with aserving(
        backend, backend.directory, config=config(backend, accounts), limits=limits
    ) as server:
        flood = await in_thread(run_as, accounts.outsider, FLOOD, str(server.path), "2000")
        assert flood == [{"codes": ["permission-denied"], "answered": 2000}]
        assert len(backend.audits) == 1  # the first refusal, in full
        server.factory.flush_refusals()  # what the interval's end does
        mine = await in_thread(as_user, accounts.admin, server.path, SETENFORCE)
    assert code(mine[0]) is None  # the admins were not disturbed
    first, summary, admin = backend.audits
    assert (first.peer.uid, first.allowed, first.count) == (accounts.outsider.uid, False, None)
    assert (summary.peer.uid, summary.op, summary.count) == (
        accounts.outsider.uid,
        "setenforce",
        1999,
    )
    assert (admin.peer.uid, admin.allowed) == (accounts.admin.uid, True)
