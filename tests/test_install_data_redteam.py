"""Red team: `shyped install-data` run by root into a tree where a hostile local user (a real
second uid) got there first -- a pre-created /etc/shyped of theirs, a kept shyped.toml that is
their file or a symlink to it. Root installed into the user's directory (the user then swaps
the configuration a root daemon reads) or kept the user's configuration as the operator's."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from user_helpers import Account, local_user, needs_users, setpriv

pytestmark = needs_users


@pytest.fixture
def user() -> Iterator[Account]:
    with local_user("shyin") as u:
        yield u


def install_data(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shyped.cli.main", "install-data", "--root", str(root),
         "--bindir", "/opt/shyped/bin"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def as_user(user: Account, script: str, cwd: Path) -> None:
    subprocess.run([*setpriv(user), "sh", "-c", script], cwd=cwd, check=True)


@pytest.mark.parametrize("plant", ["config-dir", "kept-file", "kept-link", "writable-dir"])
def test_install_data_refuses_what_another_user_put_in_its_way(user: Account, plant: str) -> None:
    with tempfile.TemporaryDirectory() as top:
        root = Path(top)
        os.chmod(root, 0o755)
        (root / "etc").mkdir(mode=0o755)
        if plant == "config-dir":
            os.chown(root / "etc", user.uid, user.gid)  # the user may make etc/shyped
            as_user(user, "mkdir -m 0755 shyped", root / "etc")
        elif plant == "writable-dir":
            (root / "etc" / "shyped").mkdir()
            os.chmod(root / "etc" / "shyped", 0o777)
        else:
            (root / "etc" / "shyped").mkdir(mode=0o777)
            os.chmod(root / "etc" / "shyped", 0o1777)  # sticky: others may add, not replace
            home = Path(top, "home")
            home.mkdir()
            os.chown(home, user.uid, user.gid)
            as_user(user, "printf '[control]\\n' > evil.toml", home)
            verb = "ln -s" if plant == "kept-link" else "cp"
            as_user(user, f"{verb} ../../home/evil.toml shyped.toml", root / "etc" / "shyped")
        r = install_data(root)
        assert r.returncode == 2, (plant, r.returncode, r.stdout, r.stderr)
        assert "not used" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "installed" not in r.stdout  # nothing written before the refusal
        assert not (root / "usr").exists()
