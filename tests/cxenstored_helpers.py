"""Xen's C xenstored (Debian's /usr/lib/xen-4.17/bin/xenstored), run without a hypervisor.

Debian starts oxenstored by default (/etc/init.d/xen tries oxenstored, then xenstored, unless
XENSTORED in /etc/default/xen names one); upstream Xen and other distributions run the C
daemon. It behaves differently where it matters to shyped: a DIRECTORY longer than 4,096
bytes is refused with E2BIG (tests/test_xenstore_listing.py). The sandbox's preload library
(shyped/sandbox/preload.c) lets it start: ``--no-domain-init`` crashes 4.17 on the first
request (its database is set up with dom0), so it starts as on a host, dom0's ring a zeroed
page in the instance directory (``/proc/xen/xsd_kva``, ``xsd_port`` rewritten there).
"""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import time
from pathlib import Path

from shyped.core.closing import Closing
from shyped.sandbox.xenstored import build_preload, probe, short_instance_dir

CXENSTORED = Path("/usr/lib/xen-4.17/bin/xenstored")


class CXenstored(Closing):
    """One C xenstored whose socket, pid file and trace live in a fresh directory."""

    def __init__(self, *args: str) -> None:
        #: extra options (e.g. ``--entry-nb 5000`` for a larger node quota)
        self.args = args
        self.directory = short_instance_dir("cxs")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def instance_dir(self) -> Path:
        """As `SandboxXenstored` names it (tests/daemon_helpers.py's Harness keeps files there)."""
        return self.directory

    @property
    def socket_path(self) -> Path:
        return self.directory / "socket"

    def start(self, timeout: float = 10.0) -> None:
        preload = build_preload()
        (self.directory / "xsd_kva").write_bytes(bytes(mmap.PAGESIZE))
        (self.directory / "xsd_port").write_text("1")
        (self.directory / "domain-state").mkdir(exist_ok=True)
        env = dict(os.environ)
        env.update(
            LD_PRELOAD=str(preload),
            SHYPED_XENSTORED_RUNDIR=str(self.directory),
            SHYPED_XENSTORED_PARENT_PID=str(os.getpid()),
            XENSTORED_ROOTDIR=str(self.directory),
        )
        argv = [str(CXENSTORED), "--no-fork", "--pid-file", str(self.directory / "pid")]
        with open(self.directory / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(
                [*argv, *self.args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.directory,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not probe(self.socket_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "stdout.log").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"C xenstored did not start: {log[-2000:]}")
            time.sleep(0.01)

    def __enter__(self) -> CXenstored:
        self.start()
        return self

    def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        shutil.rmtree(self.directory, ignore_errors=True)
