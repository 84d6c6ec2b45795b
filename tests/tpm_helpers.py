"""A real software TPM 2.0 for the tests: Debian's ``swtpm`` on loopback TCP, fresh state per
instance. tpm2-tools reach it through the TCTI ``swtpm:host=127.0.0.1,port=P``."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
from process_helpers import stop_process


def need_swtpm() -> None:
    for tool in ("swtpm", "tpm2_quote", "tpm2_checkquote"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing (scripts/install-deps.sh installs swtpm, tpm2-tools)")


@attrs.define
class Swtpm:
    port: int
    state: Path
    proc: subprocess.Popen[bytes]

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def stop(self) -> None:
        stop_process(self.proc)


def _port_pair() -> tuple[int, int]:
    """Free loopback ports P and P+1: the swtpm TCTI reaches the control channel at P+1."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port, port + 1
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def start_swtpm(state: Path) -> Swtpm:
    """``swtpm socket --tpm2`` on loopback ports P (commands) and P+1 (control),
    started and initialised (``not-need-init,startup-clear``); waits until it listens."""
    need_swtpm()
    server, ctrl = _port_pair()
    state.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["swtpm", "socket", "--tpm2", "--server", f"type=tcp,port={server},bindaddr=127.0.0.1",
         "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
         "--flags", "not-need-init,startup-clear", "--tpmstate", f"dir={state}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", server), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"swtpm did not start: {err}") from None
            time.sleep(0.05)
    return Swtpm(server, state, proc)


@contextmanager
def swtpm() -> Iterator[Swtpm]:
    directory = Path(tempfile.mkdtemp(prefix="swtpm-"))
    tpm = start_swtpm(directory / "state")
    try:
        yield tpm
    finally:
        tpm.stop()
        shutil.rmtree(directory, ignore_errors=True)


def stub_daemon(tmp_path: Path, tpm: Swtpm, policy_sha256: str = "ab" * 32) -> Any:
    """What `shyped.service.attestation.Attestation` and the attest ops read of a daemon, on
    the real reactor, with a 2,000-domain label store and an `Attestation` on `tpm` (files in
    `tmp_path`); start it with ``await d.attestation.start()``."""
    from twisted.internet import reactor

    from shyped.core.labelstore import LabelStore
    from shyped.core.modes import Mode
    from shyped.service.attestation import Attestation
    from shyped.service.attestconfig import AttestationConfig

    names = {f"guest-{i:05d}": "bank-a-web" for i in range(2000)}
    policy = SimpleNamespace(name="example.hosting", version="1.0")
    d = SimpleNamespace(
        reactor=reactor,
        engine=SimpleNamespace(labels=LabelStore(by_name=names)),
        loaded=SimpleNamespace(policy=policy, sha256=policy_sha256),
        mode=Mode.ENFORCING,
        audit=None,
        host=SimpleNamespace(domains=lambda: []),
        event_observers=[],
    )
    files = {"log": tmp_path / "m.jsonl", "ak_public": tmp_path / "ak.pem",
             "ak_auth": tmp_path / "ak.auth"}  # fmt: skip
    d.attestation = Attestation(d, AttestationConfig(enabled=True, tcti=tpm.tcti, **files))  # type: ignore[arg-type]
    return d
