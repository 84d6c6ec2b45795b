"""The sandbox oxenstored: real Debian daemon, Debian's C tools and pyxs against it."""

from __future__ import annotations

import subprocess
from typing import Any

from shyped.sandbox.xenstored import SandboxXenstored


def test_xenstore_write_is_seen_by_pyxs(xenstored: SandboxXenstored, xs: Any) -> None:
    subprocess.run(["xenstore-write", "/vm/a", "hello"], env=xenstored.env(), check=True)
    assert xs.read(b"/vm/a") == b"hello"


def test_stop_leaves_no_process(xenstored: SandboxXenstored) -> None:
    pid = xenstored.pid
    xenstored.stop()
    assert not xenstored.is_running()
    assert not (__import__("pathlib").Path("/proc") / str(pid)).exists()
    assert not xenstored.socket_path.exists()
