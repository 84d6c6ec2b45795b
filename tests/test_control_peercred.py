"""Authorization by peer credentials, with real second users: system users and groups are
created for the test (useradd/groupadd), clients run under them with setpriv, and removed
after. The client is a stdlib-only script run by /usr/bin/python3 (the venv's interpreter may
live where those users cannot read)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from control_helpers import ModelBackend, aserving, cleanup, in_thread, short_dir
from user_helpers import SYSTEM_PYTHON, Account, needs_users, setpriv, system_users

from shyped.config import ControlConfig
from shyped.control.server import ServerLimits

pytestmark = needs_users

#: Sends each argv line as a request on its own connection (or all on one with --one) and
#: prints the answers as JSON lines; an EOF instead of an answer prints {"eof": true}.
CLIENT = r"""
import json, socket, sys
path, mode, lines = sys.argv[1], sys.argv[2], sys.argv[3:]
socks = []
def ask(s, line):
    try:
        s.sendall(line.encode() + b"\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may answer (busy, too-large) and close before reading it all
    buf = b""
    while not buf.endswith(b"\n"):
        c = s.recv(65536)
        if not c:
            return {"eof": True, "partial": buf.decode(errors="replace")}
        buf += c
    return json.loads(buf)
for line in lines:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    if mode == "hold":
        socks.append(s)  # keep every connection open
    print(json.dumps(ask(s, line)), flush=True)
    if mode != "hold":
        s.close()
"""


@attrs.frozen
class Accounts:
    read_group: str
    read_gid: int
    admin_group: str
    admin_gid: int
    reader: Account  # primary group: the read group
    admin: Account  # primary group: the admin group
    outsider: Account  # its own group only


@pytest.fixture(scope="module")
def accounts() -> Iterator[Accounts]:
    with system_users(["shyt-r", "shyt-a", "shyt-o"]) as (reader, admin, outsider):
        yield Accounts(
            read_group=reader.name,
            read_gid=reader.gid,
            admin_group=admin.name,
            admin_gid=admin.gid,
            reader=reader,
            admin=admin,
            outsider=outsider,
        )


@pytest.fixture
def backend() -> Iterator[ModelBackend]:
    directory = short_dir("ctlp")
    os.chmod(directory, 0o755)  # the other users must reach the socket
    try:
        yield ModelBackend(directory)
    finally:
        cleanup(directory)


def as_user(
    account: Account, path: Path, *lines: str, groups: tuple[int, ...] = (), hold: bool = False
) -> list[dict[str, Any]]:
    """Run the client as `account` (its primary gid; `groups` as supplementary groups)."""
    argv = [
        *setpriv(account, groups),
        SYSTEM_PYTHON,
        "-c",
        CLIENT,
        str(path),
        "hold" if hold else "each",
        *lines,
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


STATUS = '{"version": 1, "op": "status"}'
SETENFORCE = '{"version": 1, "op": "setenforce", "args": {"mode": "permissive"}}'


def code(answer: dict[str, Any]) -> str | None:
    return None if answer.get("ok") else answer.get("error", {}).get("code", "eof")


def config(backend: ModelBackend, acc: Accounts) -> ControlConfig:
    return ControlConfig(
        socket=backend.directory / "control.sock",
        read_group=acc.read_group,
        admin_group=acc.admin_group,
    )


@pytest_twisted.ensureDeferred
async def test_read_group_may_query_but_not_change(
    backend: ModelBackend, accounts: Accounts
) -> None:
    async with aserving(backend, backend.directory, config=config(backend, accounts)) as server:
        status, change = await in_thread(as_user, accounts.reader, server.path, STATUS, SETENFORCE)
    assert status["ok"] is True and status["result"]["policy"]["name"] == "example"
    assert code(change) == "permission-denied"
    assert f"uid {accounts.reader.uid}" in change["error"]["message"]
    assert backend.mode == "enforcing"
    refused = [a for a in backend.audits if a.op == "setenforce"]
    assert [(a.allowed, a.code, a.peer.uid, a.peer.gid) for a in refused] == [
        (False, "permission-denied", accounts.reader.uid, accounts.read_gid)
    ]


@pytest_twisted.ensureDeferred
async def test_others_are_refused_everything(backend: ModelBackend, accounts: Accounts) -> None:
    async with aserving(backend, backend.directory, config=config(backend, accounts)) as server:
        answers = await in_thread(as_user, accounts.outsider, server.path, STATUS, SETENFORCE)
        # the refusal did not disturb anyone: root is still served
        root = await in_thread(as_user, Account("root", 0, 0), server.path, STATUS)
    assert [code(a) for a in answers] == ["permission-denied", "permission-denied"]
    assert root[0]["ok"] is True
    assert backend.mode == "enforcing"


@pytest_twisted.ensureDeferred
async def test_supplementary_groups_count(backend: ModelBackend, accounts: Accounts) -> None:
    async with aserving(backend, backend.directory, config=config(backend, accounts)) as server:
        reader = await in_thread(
            as_user,
            accounts.outsider,
            server.path,
            STATUS,
            SETENFORCE,
            groups=(accounts.read_gid,),
        )
        admin = await in_thread(
            as_user, accounts.outsider, server.path, SETENFORCE, groups=(accounts.admin_gid,)
        )
    assert [code(a) for a in reader] == [None, "permission-denied"]
    assert admin[0]["ok"] is True and admin[0]["result"]["mode"] == "permissive"


@pytest_twisted.ensureDeferred
async def test_admin_group_and_root_may_change(backend: ModelBackend, accounts: Accounts) -> None:
    async with aserving(backend, backend.directory, config=config(backend, accounts)) as server:
        admin = await in_thread(as_user, accounts.admin, server.path, SETENFORCE)
        back = '{"version": 1, "op": "setenforce", "args": {"mode": "enforcing"}}'
        root = await in_thread(as_user, Account("root", 0, 0), server.path, back)
    assert admin[0]["result"] == {"mode": "permissive", "previous": "enforcing"}
    assert root[0]["result"] == {"mode": "enforcing", "previous": "permissive"}
    assert [(a.peer.uid, a.allowed, a.code) for a in backend.audits] == [
        (accounts.admin.uid, True, None),
        (0, True, None),
    ]


@pytest_twisted.ensureDeferred
async def test_unprivileged_limits(backend: ModelBackend, accounts: Accounts) -> None:
    limits = ServerLimits(max_connections_per_uid=2)
    big = '{"version": 1, "op": "status", "id": "' + "x" * 70_000 + '"}'
    async with aserving(
        backend, backend.directory, config=config(backend, accounts), limits=limits
    ) as server:
        held = await in_thread(
            as_user, accounts.reader, server.path, STATUS, STATUS, STATUS, hold=True
        )
        too_big = await in_thread(as_user, accounts.reader, server.path, big)
        # root is not bound by the per-uid cap, and reads the same 70 kB line (whose 70 kB id
        # it then refuses as a bad request, not as too large)
        root = await in_thread(
            as_user, Account("root", 0, 0), server.path, big, big, big, hold=True
        )
    assert [code(a) for a in held] == [None, None, "busy"]
    assert code(too_big[0]) == "too-large" and too_big[0]["error"]["details"]["limit"] == 65536
    assert [code(a) for a in root] == ["bad-request"] * 3
