"""Real second users for attack tests: system users and groups made with useradd/groupadd
(random suffix), clients run under them with setpriv, and removed afterwards. Clients are
stdlib-only scripts run by /usr/bin/python3 (the venv's interpreter may live where those users
cannot read)."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import attrs
import pytest

SYSTEM_PYTHON = "/usr/bin/python3"

#: Skip marker for the tests that need root, the account tools and /usr/bin/python3.
needs_users = pytest.mark.skipif(
    os.geteuid() != 0
    or not all(shutil.which(t) for t in ("useradd", "groupadd", "userdel", "groupdel", "setpriv"))
    or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root, useradd/groupadd/setpriv and /usr/bin/python3",
)


@attrs.frozen
class Account:
    name: str
    uid: int
    gid: int


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@contextmanager
def system_users(prefixes: Sequence[str]) -> Iterator[list[Account]]:
    """One system user per prefix (``<prefix><random>``), each with a group of its own name as
    its primary group; removed, with the groups, on the way out."""
    tag = secrets.token_hex(3)
    names = [f"{p}{tag}" for p in prefixes]
    made_groups: list[str] = []
    made_users: list[str] = []
    try:
        for name in names:
            _run("groupadd", "--system", name)
            made_groups.append(name)
        for name in names:
            _run(
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--gid",
                name,
                name,
            )
            made_users.append(name)
        yield [Account(n, pwd.getpwnam(n).pw_uid, pwd.getpwnam(n).pw_gid) for n in names]
    finally:
        for u in made_users:
            subprocess.run(["userdel", u], check=False, capture_output=True)
        for g in made_groups:
            subprocess.run(["groupdel", g], check=False, capture_output=True)
    for name in names:
        with pytest.raises(KeyError):
            pwd.getpwnam(name)


def setpriv(account: Account, groups: Sequence[int] = ()) -> list[str]:
    """The argv prefix that runs a command as `account` (its primary gid; `groups` as
    supplementary groups, none by default)."""
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


@contextmanager
def local_user(prefix: str = "shyu") -> Iterator[Account]:
    """One fresh system user with a group of its own (see `system_users`)."""
    with system_users([prefix]) as (user,):
        yield user


def python_as(account: Account, script: str, args: Sequence[str] = ()) -> list[str]:
    """argv running the stdlib-only `script` under the system Python as `account`."""
    return [*setpriv(account), SYSTEM_PYTHON, "-c", script, *args]


def skip_unless_checkout_readable(account: Account, python: str, module: str = "shyped") -> None:
    """Skip when `account` cannot run this checkout's `python` and import `module` (a clone
    under a 0700 directory, an interpreter under /root): the tests that run the project's own
    commands as a second user need both, the stdlib-only clients above do not."""
    probe = subprocess.run(
        [*setpriv(account), python, "-c", f"import {module}"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["cannot run"])[-1]
        pytest.skip(f"this checkout is not readable by other users ({why[:200]})")
