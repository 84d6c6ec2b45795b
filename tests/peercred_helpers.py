"""Real second users for attack tests: system users and groups created with useradd/groupadd
(random suffix) and removed after; clients run under them with setpriv. The client is a
stdlib-only script run by /usr/bin/python3 (the venv's interpreter may live where those users
cannot read)."""

from __future__ import annotations

import grp
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
from control_helpers import ModelBackend, cleanup, short_dir
from user_helpers import SYSTEM_PYTHON, setpriv, system_users
from user_helpers import Account as Account  # re-exported for the control tests
from user_helpers import needs_users as needs_users

from shyped.service.config import ControlConfig

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
    #: More outsiders (each with its own group), when asked for.
    outsiders: tuple[Account, ...] = ()


@contextmanager
def system_accounts(more_outsiders: int = 0) -> Iterator[Accounts]:
    """A read group, an admin group, a member of each and outsiders (1 + `more_outsiders`)."""
    prefixes = ["shyt-r", "shyt-a", "shyt-o", *(f"shyt-o{i}" for i in range(more_outsiders))]
    with system_users(prefixes) as users:
        reader, admin, outsider, *more = users
        yield Accounts(
            read_group=reader.name,
            read_gid=grp.getgrnam(reader.name).gr_gid,
            admin_group=admin.name,
            admin_gid=grp.getgrnam(admin.name).gr_gid,
            reader=reader,
            admin=admin,
            outsider=outsider,
            outsiders=tuple(more),
        )


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


def spawn_as(
    account: Account, script: str, *args: str, groups: tuple[int, ...] = ()
) -> subprocess.Popen[str]:
    """Start the stdlib-only `script` as `account`; stdin/stdout are pipes (text)."""
    return subprocess.Popen(
        [*setpriv(account, groups), SYSTEM_PYTHON, "-c", script, *args],
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
        [*setpriv(account, groups), SYSTEM_PYTHON, "-c", script, *args],
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
