"""The real daemon as an operator meets it: ``shyped --config …`` as a child process on a sandbox
host (real oxenstored, the sandbox toolstack as xl), with `shypectl` and `shype-xl` run as
subprocesses against its control socket. Nothing here stands in for the daemon."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
from process_helpers import ShypedProcess

from shyped.sandbox.toolstack import Toolstack
from shyped.sandbox.xenstored import SandboxXenstored
from shyped.sandbox.xsconn import XsConn

ROOT = Path(__file__).resolve().parents[1]
HOSTING = ROOT / "conf" / "policies" / "hosting.toml"
LABELS = ROOT / "conf" / "labels.json"
POLICY = "example.hosting"
PY = sys.executable

CFG = """\
name = "{name}"
uuid = "{uuid}"
type = "pv"
kernel = "/guest/vmlinuz"
memory = 128
"""


def acm(label: str) -> str:
    return f"ACM:{POLICY}:{label}"


def uuid_of(name: str) -> str:
    n = sum(ord(c) * (i + 1) for i, c in enumerate(name))
    return f"5a0e1c9e-2a4d-4c55-9e0e-{n:012x}"


def image(name: str, access: str = "rw", vdev: str = "xvda") -> str:
    return f"format=raw,vdev={vdev},access={access},target=/srv/xen/images/{name}.img"


@attrs.define
class Host:
    """A sandbox host with a private copy of the example policy and label store, a
    configuration naming them, and (once started) the daemon."""

    xsd: SandboxXenstored
    ts: Toolstack
    directory: Path  # short: AF_UNIX paths
    mode: str = "enforcing"
    daemon: ShypedProcess | None = None
    #: Appended to the configuration, right after ``[control]``'s socket (more keys, tables).
    extra: str = ""

    @property
    def config(self) -> Path:
        return self.directory / "shyped.toml"

    @property
    def policy(self) -> Path:
        return self.directory / "policy.toml"

    @property
    def labels(self) -> Path:
        return self.directory / "labels.json"

    @property
    def socket(self) -> Path:
        return self.directory / "control.sock"

    def write_config(self) -> None:
        if not self.policy.exists():
            shutil.copy(HOSTING, self.policy)
            shutil.copy(LABELS, self.labels)
        self.config.write_text(
            f'[policy]\npath = "{self.policy}"\nlabels = "{self.labels}"\n'
            f'[enforcement]\nmode = "{self.mode}"\ndevice_close_timeout = 2.0\n'
            f'[xenstore]\nsocket = "{self.xsd.socket_path}"\n'
            '[actuator]\nkind = "sandbox"\n'
            f'[control]\nsocket = "{self.socket}"\n' + self.extra
        )

    def start(self, env: Mapping[str, str] | None = None, *, ready: bool = True) -> ShypedProcess:
        self.write_config()
        n = len(list(self.directory.glob("daemon*.log")))
        self.daemon = ShypedProcess(self.config, self.directory / f"daemon{n}.log", env)
        if ready:
            self.daemon.wait_ready()
        return self.daemon

    def stop(self) -> int:
        assert self.daemon is not None
        code = self.daemon.stop()
        assert "Traceback" not in self.daemon.text(), self.daemon.text()
        self.daemon = None
        return code

    def log(self) -> str:
        assert self.daemon is not None
        return self.daemon.text()

    # ---- the operator's tools -----------------------------------------------------------

    def run(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``shypectl --socket S ARGS…``"""
        return self.run([PY, "-m", "shyped.cli.shypectl", "--socket", str(self.socket), *args])

    def xl_argv(self) -> list[str]:
        return [PY, "-m", "shyped.sandbox", "--socket", str(self.xsd.socket_path)]

    def shype_xl(self, *args: str, xl: str | None = None) -> subprocess.CompletedProcess[str]:
        """``shype-xl --socket S --xl "<sandbox xl>" ARGS…``"""
        argv = [PY, "-m", "shyped.cli.shypexl", "--socket", str(self.socket)]
        argv += ["--xl", xl or " ".join(self.xl_argv()), "--admission-timeout", "60"]
        return self.run([*argv, *args])

    def xl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The sandbox's own xl, bypassing shyped's wrapper."""
        return self.run([*self.xl_argv(), *args])

    def xl_list(self) -> dict[str, str]:
        """name -> xl's state flags (``--p---`` when paused)."""
        out = self.xl("list").stdout
        return {line.split()[0]: line.split()[4] for line in out.splitlines()[1:]}

    def cfg(
        self,
        name: str,
        label: str | None = None,
        *,
        disks: Iterable[str] = (),
        vifs: Iterable[str] = (),
        uuid: str | None = None,
    ) -> Path:
        text = CFG.format(name=name, uuid=uuid or uuid_of(name))
        if label is not None:
            text += f'seclabel = "{acm(label)}"\n'
        if disks:
            text += "disk = [" + ", ".join(f"'{d}'" for d in disks) + "]\n"
        if vifs:
            text += "vif = [" + ", ".join(f"'{v}'" for v in vifs) + "]\n"
        path = self.directory / f"{name}.cfg"
        path.write_text(text)
        return path

    # ---- looking at xenstore ------------------------------------------------------------

    def read(self, path: str) -> str | None:
        with XsConn(str(self.xsd.socket_path)) as xs:
            return xs.read(path)

    def domid(self, name: str) -> int:
        for d in self.ts.list_domains():
            if d.name == name:
                return d.domid
        raise AssertionError(f"no domain {name!r}: {self.xl_list()}")

    def label_node(self, name: str) -> str | None:
        return self.read(f"/local/domain/{self.domid(name)}/shyped/label")


def audit_records(host: Host) -> list[dict[str, Any]]:
    """Every record in the host's audit directory (``[audit] directory = <dir>/audit``), in
    order; a line still being written is skipped."""
    out = []
    for path in sorted((host.directory / "audit").iterdir()):
        for line in path.read_bytes().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and "kind" in doc:
                out.append(doc)
    return out


@contextmanager
def sandbox_host(xsd: SandboxXenstored) -> Iterator[Host]:
    """A booted sandbox host in a fresh short directory; the daemon (if started) is stopped
    afterwards and must exit 0 without a traceback."""
    ts = Toolstack(xsd.socket_path)
    ts.boot_host()
    directory = Path(tempfile.mkdtemp(dir="/tmp", prefix="shy"))
    h = Host(xsd, ts, directory)
    try:
        yield h
    finally:
        try:
            if h.daemon is not None:
                assert h.stop() == 0
        finally:
            for log in sorted(directory.glob("daemon*.log")):
                print(f"---- {log.name}\n{log.read_text()}")  # pytest shows it on failure
            shutil.rmtree(directory, ignore_errors=True)
