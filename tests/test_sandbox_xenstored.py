"""The sandbox oxenstored: Debian's real daemon, Debian's C tools and pyxs against it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyxs import PyXSError
from pyxs._internal import Op
from user_helpers import local_user, needs_users

from shyped.sandbox.xenstored import (
    AlreadyRunning,
    DomainState,
    PrerequisiteMissing,
    SandboxXenstored,
    SandboxXenstoredError,
    XenstoredDied,
    build_preload,
    short_instance_dir,
)

# `xenstore-ls -fp /` of a fresh Xen 4.17 host (/work/shared/xen-4.17-reference/
# layout-before-create.txt) minus what xen-init-dom0 and the dom0 kernel write afterwards
# (/local/domain/0/..., /local/pool/...): the daemon itself creates only these nodes.
FRESH_DAEMON_TREE = [
    '/@introduceDomain = ""   (n0)',
    '/@releaseDomain = ""   (n0)',
    '/local = ""   (n0)',
    '/tool = ""   (n0)',
    '/tool/xenstored = "/usr/lib/xen-4.17/bin/oxenstored"   (n0)',
]


def run_tool(xenstored: SandboxXenstored, *argv: str) -> str:
    """Run one of Debian's xenstore-* tools against the instance and return its stdout."""
    result = subprocess.run(
        argv, env=xenstored.env(), capture_output=True, text=True, timeout=10, check=True
    )
    return result.stdout


def oxenstored_pids_in(directory: Path) -> set[int]:
    """Pids of oxenstored processes running in ``directory`` (the daemon's cwd)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "cwd") == str(directory) and "oxenstored" in os.readlink(
                entry / "exe"
            ):
                pids.add(int(entry.name))
        except OSError:
            continue
    return pids


def wait_until_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def spare_dir() -> Iterator[Path]:
    directory = short_instance_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


class Watcher:
    """Collects a pyxs monitor's events on a thread."""

    def __init__(self, xenstored: SandboxXenstored, *paths: bytes) -> None:
        self._client = xenstored.client()
        self._client.connect()
        self._monitor = self._client.monitor()
        self.events: list[bytes] = []
        self._cond = threading.Condition()
        for path in paths:
            self._monitor.watch(path, b"t")
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for event in self._monitor.wait():
                with self._cond:
                    self.events.append(event.path)
                    self._cond.notify_all()
        except Exception:
            return

    def wait_for(self, path: bytes, count: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.events.count(path) >= count, timeout)

    def close(self) -> None:
        self._client.close()


# -- clients -------------------------------------------------------------------------------


def test_xenstore_write_is_seen_by_pyxs(xenstored: SandboxXenstored, xs: Any) -> None:
    run_tool(xenstored, "xenstore-write", "/vm/a", "hello")
    assert xs.read(b"/vm/a") == b"hello"


def test_pyxs_write_is_seen_by_xenstore_read_and_ls(xenstored: SandboxXenstored, xs: Any) -> None:
    xs.write(b"/vm/b", b"world")
    xs.set_perms(b"/vm/b", [b"n0", b"r3"])
    assert run_tool(xenstored, "xenstore-read", "/vm/b") == "world\n"
    assert '/vm/b = "world"   (n0,r3)' in run_tool(xenstored, "xenstore-ls", "-fp", "/vm")


def test_pyxs_write_fires_xenstore_watch(xenstored: SandboxXenstored, xs: Any) -> None:
    watch = subprocess.Popen(
        ["xenstore-watch", "-n", "2", "/vm"],
        env=xenstored.env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stdout is not None
        assert watch.stdout.readline() == "/vm\n"  # the initial firing: watch is registered
        xs.write(b"/vm/c", b"1")
        out, _ = watch.communicate(timeout=10)
        assert out == "/vm/c\n"
    finally:
        watch.kill()
        watch.wait()


def test_access_log_records_operations(xenstored: SandboxXenstored) -> None:
    run_tool(xenstored, "xenstore-write", "/vm/logged", "v")
    assert "write     /vm/logged v" in xenstored.access_log_path.read_text()


def test_fresh_tree_is_what_the_daemon_creates(xenstored: SandboxXenstored) -> None:
    assert run_tool(xenstored, "xenstore-ls", "-fp", "/").splitlines() == FRESH_DAEMON_TREE


def test_config_overrides_reach_the_daemon(spare_dir: Path) -> None:
    # (Below 32 bytes the daemon cannot even store /tool/xenstored and dies at start.)
    with SandboxXenstored(spare_dir, config={"quota-maxsize": 64}) as small, small.client() as c:
        c.write(b"/ok", b"x" * 64)
        with pytest.raises(PyXSError):
            c.write(b"/too-big", b"x" * 65)


# -- isolation and lifecycle ---------------------------------------------------------------


def test_two_instances_do_not_see_each_other(xenstored: SandboxXenstored, spare_dir: Path) -> None:
    with SandboxXenstored(spare_dir) as other:
        run_tool(xenstored, "xenstore-write", "/only-in-first", "1")
        run_tool(other, "xenstore-write", "/only-in-second", "2")
        assert "/only-in-second" not in run_tool(xenstored, "xenstore-ls", "-f", "/")
        assert "/only-in-first" not in run_tool(other, "xenstore-ls", "-f", "/")


def test_second_start_in_live_directory_fails_and_spawns_nothing(
    xenstored: SandboxXenstored,
) -> None:
    intruder = SandboxXenstored(xenstored.instance_dir)
    with pytest.raises(AlreadyRunning, match=str(xenstored.instance_dir)):
        intruder.start()
    assert not intruder.is_running()
    assert oxenstored_pids_in(xenstored.instance_dir) == {xenstored.pid}
    assert run_tool(xenstored, "xenstore-read", "/tool/xenstored")


def test_live_xenstored_on_socket_path_is_not_clobbered(
    xenstored: SandboxXenstored, spare_dir: Path
) -> None:
    # Another directory whose socket path leads to the live daemon (not started by us there).
    (spare_dir / "socket").symlink_to(xenstored.socket_path)
    intruder = SandboxXenstored(spare_dir)
    with pytest.raises(AlreadyRunning, match="already answers"):
        intruder.start()
    assert not intruder.is_running()
    assert oxenstored_pids_in(spare_dir) == set()
    assert run_tool(xenstored, "xenstore-read", "/tool/xenstored")


def test_killed_daemon_is_reported(xenstored: SandboxXenstored) -> None:
    os.kill(xenstored.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while xenstored.is_running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not xenstored.is_running()
    with pytest.raises(XenstoredDied, match="SIGKILL"):
        xenstored.check()


def test_stop_leaves_no_process(xenstored: SandboxXenstored) -> None:
    pid = xenstored.pid
    xenstored.stop()
    assert not xenstored.is_running()
    assert not Path(f"/proc/{pid}").exists()
    assert not xenstored.socket_path.exists()
    xenstored.stop()  # idempotent


def test_daemon_dies_with_the_process_that_started_it(spare_dir: Path) -> None:
    script = (
        "import sys, time\n"
        "from shyped.sandbox.xenstored import SandboxXenstored\n"
        "x = SandboxXenstored(sys.argv[1]); x.start()\n"
        "print(x.pid, flush=True); time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(spare_dir)], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    assert wait_until_gone(pid)


def test_error_when_started_twice(xenstored: SandboxXenstored) -> None:
    with pytest.raises(AlreadyRunning):
        xenstored.start()


# -- prerequisites and bad input -----------------------------------------------------------


def test_missing_oxenstored_names_the_package(spare_dir: Path) -> None:
    with pytest.raises(PrerequisiteMissing, match=r"xen-utils-4\.17"):
        SandboxXenstored(spare_dir, binary=spare_dir / "no-such-oxenstored").start()


def test_missing_gcc_is_named(spare_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(spare_dir))
    with pytest.raises(PrerequisiteMissing, match="gcc"):
        build_preload(spare_dir / "cache")


def test_preload_is_cached(spare_dir: Path) -> None:
    first = build_preload(spare_dir)
    assert build_preload(spare_dir) == first
    assert [p.name for p in spare_dir.iterdir()] == [first.name]  # no temp file left


@needs_users
def test_a_library_planted_by_another_user_is_never_preloaded(spare_dir: Path) -> None:
    """Root running the demo with a user's $XDG_CACHE_HOME (sudo -E) must not load that
    user's code into oxenstored: the user plants a library under the name root would use."""
    genuine = build_preload(spare_dir / "genuine")
    with local_user("shyca") as user:
        cache = spare_dir / "user-cache"
        cache.mkdir()
        os.chown(cache, user.uid, user.gid)
        planted = cache / genuine.name
        shutil.copy(genuine, planted)  # stands for the user's own build of any code
        os.chown(planted, user.uid, user.gid)
        with pytest.raises(SandboxXenstoredError, match="owned by uid"):
            build_preload(cache)
        # a root-owned but world-writable folder is refused as well
        planted.unlink()
        os.chown(cache, 0, 0)
        cache.chmod(0o777)
        with pytest.raises(SandboxXenstoredError, match="writable by others"):
            build_preload(cache)


def test_too_long_instance_dir_is_refused() -> None:
    with pytest.raises(ValueError, match="too long"):
        SandboxXenstored(Path("/tmp") / ("x" * 120))


def test_daemon_failing_at_start_reports_its_log(spare_dir: Path) -> None:
    # Too small to store /tool/xenstored: oxenstored dies with Quota.Data_too_big at start.
    broken = SandboxXenstored(spare_dir, config={"quota-maxsize": 8})
    with pytest.raises(XenstoredDied, match=r"(?s)exited with status 2.*Data_too_big"):
        broken.start(timeout=5)
    assert oxenstored_pids_in(spare_dir) == set()


# -- simulated hypervisor events -----------------------------------------------------------


def test_introduce_fires_introduce_domain(xenstored: SandboxXenstored, xs: Any) -> None:
    watcher = Watcher(xenstored, b"@introduceDomain")
    try:
        assert watcher.wait_for(b"@introduceDomain", 1)  # initial firing
        xs.introduce_domain(5, 1234, 7)
        assert watcher.wait_for(b"@introduceDomain", 2)
        assert xs.is_domain_introduced(5)
    finally:
        watcher.close()


@pytest.mark.parametrize("state", [DomainState.DYING, DomainState.GONE])
def test_dead_domain_is_released_by_the_daemon(
    xenstored: SandboxXenstored, xs: Any, state: DomainState
) -> None:
    xs.introduce_domain(3, 1, 1)
    xs.mkdir(b"/local/domain/3")
    xs.set_perms(b"/local/domain/3", [b"n0", b"r3"])
    xs.write(b"/local/domain/3/owned", b"by-guest")
    xs.set_perms(b"/local/domain/3/owned", [b"n3"])
    watcher = Watcher(xenstored, b"@releaseDomain")
    try:
        assert watcher.wait_for(b"@releaseDomain", 1)
        xenstored.set_domain_state(3, state)
        assert watcher.wait_for(b"@releaseDomain", 2)
        assert not xs.is_domain_introduced(3)
        # Store.reset_permissions: the dead domain's ACL entries go, nodes it owned go too.
        assert xs.get_perms(b"/local/domain/3") == [b"n0"]
        assert not xs.exists(b"/local/domain/3/owned")
    finally:
        watcher.close()


def test_shutdown_fires_release_domain_but_keeps_domain(
    xenstored: SandboxXenstored, xs: Any
) -> None:
    xs.introduce_domain(4, 1, 1)
    watcher = Watcher(xenstored, b"@releaseDomain")
    try:
        assert watcher.wait_for(b"@releaseDomain", 1)
        xenstored.set_domain_state(4, DomainState.SHUTDOWN, shutdown_code=0)
        assert watcher.wait_for(b"@releaseDomain", 2)
        assert xs.is_domain_introduced(4)
    finally:
        watcher.close()


def test_explicit_release_fires_release_domain(xenstored: SandboxXenstored, xs: Any) -> None:
    xs.introduce_domain(6, 1, 1)
    watcher = Watcher(xenstored, b"@releaseDomain")
    try:
        assert watcher.wait_for(b"@releaseDomain", 1)
        xs.execute_command(Op.RELEASE, b"6\x00")  # pyxs's release_domain refuses client-side
        assert watcher.wait_for(b"@releaseDomain", 2)
        assert not xs.is_domain_introduced(6)
    finally:
        watcher.close()


def test_domain_events_need_domain_init(spare_dir: Path) -> None:
    with (
        SandboxXenstored(spare_dir, domain_init=False) as plain,
        plain.client() as c,
    ):
        with pytest.raises(PyXSError):
            c.introduce_domain(5, 1, 1)  # no dom0 connection: oxenstored answers EINVAL
        with pytest.raises(SandboxXenstoredError, match="domain_init"):
            plain.set_domain_state(5, DomainState.GONE)


# -- CLI -----------------------------------------------------------------------------------


def test_cli_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shyped.sandbox.xenstored", "start", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--dir" in result.stdout


def test_cli_runs_until_sigterm(spare_dir: Path) -> None:
    cli = subprocess.Popen(
        [sys.executable, "-m", "shyped.sandbox.xenstored", "start", "--dir", str(spare_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert cli.stdout is not None
        export = next(line for line in cli.stdout if line.startswith("export XENSTORED_PATH="))
        socket_path = export.strip().split("=", 1)[1]
        assert socket_path == str(spare_dir / "socket")
        env = dict(os.environ, XENSTORED_PATH=socket_path)
        subprocess.run(["xenstore-write", "/cli", "yes"], env=env, check=True, timeout=10)
        daemons = oxenstored_pids_in(spare_dir)
        assert len(daemons) == 1
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=10) == 0
        assert all(wait_until_gone(pid) for pid in daemons)
    finally:
        cli.kill()
        cli.wait()
