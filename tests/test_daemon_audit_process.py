"""The ``shyped`` process with an audit trail: SIGKILL in the middle of a scenario leaves a log
that ``shypectl audit verify`` accepts, every veto carried out before the kill has its record
(the veto waited for the fsync), and the chain continues after a restart."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import HOSTING, LABELS, domcfg
from process_helpers import ShypedProcess, wait_until
from wiring_helpers import records, shypectl_verify

from shyped.sandbox.toolstack import Toolstack
from shyped.sandbox.xenstored import SandboxXenstored

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp: Path, socket: Path, audit: Path) -> Path:
    path = tmp / "shyped.toml"
    labels = tmp / "labels.json"  # a private copy: the daemon rewrites it on a rename
    if not labels.exists():
        shutil.copy(LABELS, labels)
    path.write_text(
        f'[policy]\npath = "{HOSTING}"\nlabels = "{labels}"\n'
        '[enforcement]\nmode = "enforcing"\n'
        f'[xenstore]\nsocket = "{socket}"\n'
        '[actuator]\nkind = "sandbox"\n'
        f'[control]\nsocket = "{tmp / "control.sock"}"\n'
        f'[audit]\ndirectory = "{audit}"\nretry_interval = 0.5\n'
    )
    return path


@pytest.fixture
def host(xenstored: SandboxXenstored) -> Iterator[Toolstack]:
    ts = Toolstack(xenstored.socket_path)
    ts.boot_host()
    yield ts


def test_sigkill_mid_scenario_leaves_a_verifiable_log_that_continues_after_restart(
    host: Toolstack, xenstored: SandboxXenstored, tmp_path: Path
) -> None:
    audit = tmp_path / "audit"
    config = write_config(tmp_path, xenstored.socket_path, audit)
    first = ShypedProcess.start(config, tmp_path / "log1")
    try:
        host.create(domcfg("web-a1"))
        # A stream of competitors the daemon destroys, killed while it goes on.
        created: list[int] = []
        stop = threading.Event()

        def flood() -> None:
            n = 0
            while not stop.is_set():  # web-b1: Chinese Wall; the others: unlabelled
                n += 1
                created.append(host.create(domcfg(f"web-b{n}")))
                time.sleep(0.02)

        worker = threading.Thread(target=flood)
        worker.start()

        def gone() -> int:
            alive = {d.domid for d in host.list_domains()}
            return sum(1 for d in list(created) if d not in alive)

        wait_until(lambda: gone() >= 3)
    finally:
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        stop.set()
        worker.join(timeout=30)
    alive = {d.domid for d in host.list_domains()}
    destroyed = [d for d in created if d not in alive]
    assert destroyed
    after_kill = shypectl_verify(audit)
    assert after_kill.returncode == 0, after_kill.stdout + after_kill.stderr
    recs = records(audit)
    denied = {
        r["subject"]["domid"] for r in recs if r["kind"] == "decision" and r["decision"] == "deny"
    }
    assert set(destroyed) <= denied  # every carried-out veto was on disk first
    assert not any(r["kind"] == "daemon-stop" for r in recs)

    second = ShypedProcess.start(config, tmp_path / "log2")
    try:
        # The competitors left paused while it was down are decided now.
        wait_until(lambda: not [d for d in host.list_domains() if d.name.startswith("web-b")])
    finally:
        assert second.stop() == 0
    verified = shypectl_verify(audit)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    recs = records(audit)
    kinds = Counter(r["kind"] for r in recs)
    assert kinds["daemon-start"] == 2 and kinds["daemon-stop"] == 1
    assert [r["seq"] for r in recs] == list(range(recs[0]["seq"], recs[0]["seq"] + len(recs)))
    assert recs[-1]["kind"] == "daemon-stop"
