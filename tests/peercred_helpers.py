"""Real second users for attack tests: system users and groups created with useradd/groupadd
(random suffix) and removed after; clients run under them with setpriv. The client is a
stdlib-only script run by /usr/bin/python3 (the venv's interpreter may live where those users
cannot read)."""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
from control_helpers import ModelBackend, cleanup, short_dir

from shyped.service.config import ControlConfig

SYSTEM_PYTHON = "/usr/bin/python3"

needs_users = pytest.mark.skipif(
    os.geteuid() != 0
    or not all(shutil.which(t) for t in ("useradd", "groupadd", "userdel", "groupdel", "setpriv"))
    or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root, useradd/groupadd/setpriv and /usr/bin/python3",
)

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
class Account:
    name: str
    uid: int
    gid: int


@attrs.frozen
class Accounts:
    read_group: str
    read_gid: int
    admin_group: str
    admin_gid: int
    reader: Account  # primary group: the read group
    admin: Account  # primary group: the admin group
    outsider: Account  # its own group only
    #: More outsiders (each with its own group), when asked for.
    outsiders: tuple[Account, ...] = ()


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@contextmanager
def system_accounts(more_outsiders: int = 0) -> Iterator[Accounts]:
    """A read group, an admin group, a member of each and outsiders (1 + `more_outsiders`)."""
    tag = secrets.token_hex(3)
    extra = [f"shyt-o{i}{tag}" for i in range(more_outsiders)]
    groups = [f"shyt-r{tag}", f"shyt-a{tag}", f"shyt-o{tag}", *extra]
    users = list(groups)
    made_groups: list[str] = []
    made_users: list[str] = []
    try:
        for g in groups:
            _run("groupadd", "--system", g)
            made_groups.append(g)
        for u, g in zip(users, groups, strict=True):
            _run(
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--gid",
                g,
                u,
            )
            made_users.append(u)

        def acc(u: str) -> Account:
            pw = pwd.getpwnam(u)
            return Account(u, pw.pw_uid, pw.pw_gid)

        yield Accounts(
            read_group=groups[0],
            read_gid=grp.getgrnam(groups[0]).gr_gid,
            admin_group=groups[1],
            admin_gid=grp.getgrnam(groups[1]).gr_gid,
            reader=acc(users[0]),
            admin=acc(users[1]),
            outsider=acc(users[2]),
            outsiders=tuple(acc(u) for u in users[3:]),
        )
    finally:
        for u in made_users:
            subprocess.run(["userdel", u], check=False, capture_output=True)
        for g in made_groups:
            subprocess.run(["groupdel", g], check=False, capture_output=True)
    for u in users:
        with pytest.raises(KeyError):
            pwd.getpwnam(u)


def as_user(
    account: Account, path: Path, *lines: str, groups: tuple[int, ...] = (), hold: bool = False
) -> list[dict[str, Any]]:
    """Run the client as `account` (its primary gid; `groups` as supplementary groups)."""
    argv = [
        *setpriv_argv(account, groups),
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


def setpriv_argv(account: Account, groups: tuple[int, ...] = ()) -> list[str]:
    """``setpriv`` as `account` (its primary gid; `groups` as supplementary groups)."""
    group_args = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    return [
        "setpriv",
        "--reuid",
        str(account.uid),
        "--regid",
        str(account.gid),
        *group_args,
        "--",
    ]


def spawn_as(
    account: Account, script: str, *args: str, groups: tuple[int, ...] = ()
) -> subprocess.Popen[str]:
    """Start the stdlib-only `script` as `account`; stdin/stdout are pipes (text)."""
    return subprocess.Popen(
        [*setpriv_argv(account, groups), SYSTEM_PYTHON, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_as(
    account: Account, script: str, *args: str, groups: tuple[int, ...] = (), timeout: float = 120
) -> list[Any]:
    """Run `script` as `account` to its end; its stdout's JSON lines."""
    result = subprocess.run(
        [*setpriv_argv(account, groups), SYSTEM_PYTHON, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@contextmanager
def reachable_backend(prefix: str) -> Iterator[ModelBackend]:
    """A `ModelBackend` in a fresh directory the test users can reach (its socket is there)."""
    directory = short_dir(prefix)
    os.chmod(directory, 0o755)
    try:
        yield ModelBackend(directory)
    finally:
        cleanup(directory)


def groups_config(backend: ModelBackend, acc: Accounts) -> ControlConfig:
    """The control socket in `backend`'s directory, with the accounts' read and admin groups."""
    return ControlConfig(
        socket=backend.directory / "control.sock",
        read_group=acc.read_group,
        admin_group=acc.admin_group,
    )
