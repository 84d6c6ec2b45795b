"""A local user who owns the folder of a file root edits (`shypectl addlabel dom CFG`) must
not be able to turn root's atomic replace into a chown/chmod of any file they choose.

The attack (found by a red-team pass): the user watches the folder, renames root's
temporary file away and puts a symlink to a root-only file in its place; a chmod/chown by
name then follows the link and hands the target to the user."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from user_helpers import local_user, needs_users, python_as

from shyped.fileio.atomicfile import write_atomic

pytestmark = needs_users

#: Swaps every temporary file that appears in the folder for a symlink to the victim.
SWAPPER = r"""
import os, sys, time
d, victim, stop = sys.argv[1], sys.argv[2], sys.argv[3]
swaps = 0
while not os.path.exists(stop):
    for n in os.listdir(d):
        if n.startswith(".guest.cfg.") and not n.endswith("x"):
            p = os.path.join(d, n)
            try:
                os.rename(p, p + "x")
                os.symlink(victim, p)
                swaps += 1
            except OSError:
                pass
print(swaps, flush=True)
"""


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder other users can traverse (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="shyat"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_swapped_temporary_never_hands_a_root_file_to_the_user(open_dir: Path) -> None:
    tmp_path = open_dir
    victim = tmp_path / "victim"
    victim.write_text("root only\n")
    victim.chmod(0o600)
    with local_user("shyat") as user:
        home = tmp_path / "home"
        home.mkdir()
        os.chown(home, user.uid, user.gid)
        cfg = home / "guest.cfg"
        cfg.write_text('name = "g"\n')
        os.chown(cfg, user.uid, user.gid)
        stop = tmp_path / "stop"
        swapper = subprocess.Popen(
            python_as(user, SWAPPER, [str(home), str(victim), str(stop)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(0.3)  # the swapper is polling
            for i in range(1500):
                # The user may break the rename itself: that costs root nothing.
                with contextlib.suppress(OSError):
                    write_atomic(
                        cfg, f'name = "g{i}"\n'.encode(), mode=0o644, owner=(user.uid, user.gid)
                    )
                st = victim.stat()
                if st.st_uid != 0 or st.st_mode & 0o777 != 0o600:
                    break
        finally:
            stop.touch()
            out, _ = swapper.communicate(timeout=30)
        st = victim.stat()
        assert int(out.strip() or 0) > 0, "the swapper never got to swap: the attack was not played"
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, 0o600)
        assert victim.read_text() == "root only\n"
