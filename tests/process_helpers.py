"""The `shyped` daemon as a child process, for tests that need a real process (signals,
SIGKILL, sd_notify, the control socket from other processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
SHYPED = [sys.executable, "-m", "shyped.cli.main"]


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    """Poll until `predicate()` holds (a liveness bound, no timing is asserted)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s {what}".rstrip())
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds; its exit status."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout)


class ShypedProcess:
    """``python -m shyped.cli.main --config CONFIG`` with its stderr (the log) in a file."""

    def __init__(
        self,
        config: Path,
        log: Path,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        """`prefix`: a command that runs the daemon (e.g. ``prlimit --nofile=256``)."""
        self.log = log
        self.stderr: IO[str] = log.open("w")
        self.proc = subprocess.Popen(
            [*prefix, *SHYPED, "--config", str(config)],
            stderr=self.stderr,
            stdout=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
        )

    @classmethod
    def start(cls, config: Path, log: Path, prefix: Sequence[str] = ()) -> ShypedProcess:
        """Start it and wait until its start-up reconcile began."""
        daemon = cls(config, log, prefix=prefix)
        wait_until(lambda: "reconcile (start)" in daemon.text() or daemon.proc.poll() is not None)
        assert daemon.proc.poll() is None, daemon.text()
        return daemon

    def text(self) -> str:
        return self.log.read_text()

    def wait_ready(self) -> None:
        wait_until(lambda: "] ready: " in self.text() or self.proc.poll() is not None, what="ready")
        assert self.proc.poll() is None, self.text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        self.stderr.close()
        return code
