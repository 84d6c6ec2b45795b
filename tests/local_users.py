"""Real local users for attack tests: created with useradd for one test, removed after.

Attacks by an unprivileged uid are played by a real account (never a faked uid), run with
setpriv. A random suffix keeps concurrent test runs apart."""

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

needs_users = pytest.mark.skipif(
    os.geteuid() != 0
    or not all(shutil.which(t) for t in ("useradd", "userdel", "setpriv"))
    or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root, useradd/setpriv and /usr/bin/python3",
)


@attrs.frozen
class LocalUser:
    name: str
    uid: int
    gid: int

    def argv(self, *cmd: str) -> list[str]:
        """`cmd` run as this user (its own group only)."""
        return [
            "setpriv",
            "--reuid",
            str(self.uid),
            "--regid",
            str(self.gid),
            "--clear-groups",
            "--",
            *cmd,
        ]


@contextmanager
def local_user(prefix: str = "shyu") -> Iterator[LocalUser]:
    """A fresh system user with its own group and no home; removed on exit."""
    name = f"{prefix}{secrets.token_hex(3)}"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
            name,
        ],
        check=True,
        capture_output=True,
    )
    try:
        pw = pwd.getpwnam(name)
        yield LocalUser(name, pw.pw_uid, pw.pw_gid)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)
        subprocess.run(["groupdel", name], check=False, capture_output=True)


def python_as(user: LocalUser, script: str, args: Sequence[str] = ()) -> list[str]:
    """argv running a stdlib-only `script` under the system Python as `user`."""
    return user.argv(SYSTEM_PYTHON, "-c", script, *args)
