"""Helpers for the daemon tests: the example hosting policy, domain configs, and a harness that
runs the real `Daemon` in-process (pytest-twisted) against a sandbox oxenstored while the
sandbox toolstack plays xl, the backends and the guests from worker threads."""

from __future__ import annotations

import shutil
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads

from shyped.core.engine import Outcome
from shyped.core.labelstore import LabelStore, load_label_store
from shyped.core.xlcfg import DomainConfig, domain_config_from_text
from shyped.sandbox.toolstack import Toolstack
from shyped.sandbox.xenstored import SandboxXenstored
from shyped.sandbox.xsconn import XsConn
from shyped.service.actuator import SandboxActuator
from shyped.service.config import ActuatorConfig, Config, DomainVeto, Mode, XenstoreConfig
from shyped.service.daemon import Daemon, load_policy
from shyped.xenstore import GatewayConfig, XenstoreGateway

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
HOSTING = ROOT / "conf" / "policies" / "hosting.toml"
LABELS = ROOT / "conf" / "labels.json"
POLICY = "example.hosting"


def uuid_of(name: str) -> str:
    """A stable uuid per test domain name."""
    n = sum(ord(c) * (i + 1) for i, c in enumerate(name))
    return f"6f1b1c9e-2a4d-4c55-9e0e-{n:012x}"


def domcfg(
    name: str,
    *,
    vifs: Iterable[str] = (),
    disks: Iterable[str] = (),
    uuid: str | None = None,
) -> DomainConfig:
    """A PV guest config as an operator would write it (``vif``/``disk`` spec strings)."""
    lines = [f'name = "{name}"', f'uuid = "{uuid or uuid_of(name)}"', "memory = 128"]
    if vifs:
        lines.append("vif = [" + ", ".join(f"'{v}'" for v in vifs) + "]")
    if disks:
        lines.append("disk = [" + ", ".join(f"'{d}'" for d in disks) + "]")
    return domain_config_from_text("\n".join(lines) + "\n", f"{name}.cfg")


def image(name: str, access: str = "rw") -> str:
    return f"format=raw,vdev=xvda,access={access},target=/srv/xen/images/{name}.img"


def make_config(
    xsd: SandboxXenstored,
    *,
    mode: Mode = Mode.ENFORCING,
    veto: DomainVeto = DomainVeto.DESTROY,
    close_timeout: float = 0.5,
    policy: Path = HOSTING,
    labels: Path = LABELS,
    actuator: str = "sandbox",
) -> Config:
    return Config(
        policy=policy,
        labels=labels,
        mode=mode,
        domain_veto=veto,
        device_close_timeout=close_timeout,
        xenstore=XenstoreConfig(socket=xsd.socket_path),
        actuator=ActuatorConfig(kind=actuator),
    )


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def eventually(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    """Let the reactor run until ``predicate()`` holds (no timing is asserted)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await sleep(0.02)


@attrs.define
class Harness:
    """A sandbox host (xenstored + toolstack) and, once started, a daemon watching it."""

    xsd: SandboxXenstored
    ts: Toolstack
    daemon: Daemon | None = None
    outcomes: list[Outcome] = attrs.field(factory=list)

    @classmethod
    def boot(cls, xsd: SandboxXenstored) -> Harness:
        ts = Toolstack(xsd.socket_path)
        ts.boot_host()
        return cls(xsd, ts)

    def config(self, **kw: Any) -> Config:
        """A configuration for this host; by default with a private copy of the example label
        store (a daemon rewrites its store, e.g. on a policy update that renames labels)."""
        if "labels" not in kw:
            private = self.xsd.instance_dir / "labels.json"
            if not private.exists():
                shutil.copy(LABELS, private)
            kw["labels"] = private
        return make_config(self.xsd, **kw)

    async def start(
        self,
        config: Config | None = None,
        *,
        labels: LabelStore | None = None,
        in_process_actuator: bool = True,
        starter: Callable[[Daemon], Awaitable[None]] | None = None,
    ) -> Daemon:
        """Start a daemon; by default its actuator calls this toolstack in worker threads
        (``in_process_actuator=False``: the sandbox CLI as a child process, as configured)."""
        config = config or self.config()
        actuator = None
        if in_process_actuator:
            actuator = SandboxActuator(self.ts.pause, self.ts.unpause, self.ts.destroy)
        gateway = XenstoreGateway(
            GatewayConfig(
                socket_path=str(self.xsd.socket_path), reconnect_initial=0.02, reconnect_max=0.2
            )
        )
        daemon = Daemon(
            config,
            load_policy(config.policy),
            labels if labels is not None else load_label_store(config.labels),
            gateway=gateway,
            actuator=actuator,
        )
        daemon.add_listener(self.outcomes.append)
        self.daemon = daemon
        await (daemon.start() if starter is None else starter(daemon))
        await daemon.settled()
        return daemon

    async def stop(self) -> None:
        if self.daemon is not None:
            if not self.daemon._stopping:  # a test may have stopped it (settled() then fails)
                await self.daemon.settled()
            await self.daemon.stop()
            self.daemon = None

    async def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """A blocking toolstack command in a worker thread (the reactor keeps running)."""
        result: T = await threads.deferToThread(fn, *args, **kw)
        return result

    async def settle(self) -> None:
        """Wait until the daemon has seen the host's last change and carried out its actions."""
        assert self.daemon is not None
        await self.daemon.settled()

    # ---- looking at the result ----------------------------------------------------------

    def read(self, path: str) -> str | None:
        with XsConn(str(self.xsd.socket_path)) as xs:
            return xs.read(path)

    def perms(self, path: str) -> tuple[str, ...] | None:
        with XsConn(str(self.xsd.socket_path)) as xs:
            return xs.get_perms(path)

    def exists(self, path: str) -> bool:
        with XsConn(str(self.xsd.socket_path)) as xs:
            return xs.read(path) is not None

    def domains(self) -> dict[str, Any]:
        """The sandbox hypervisor's domains by name."""
        return {d.name: d for d in self.ts.list_domains()}

    def decided(self, what: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.what == what]

    def last(self, what: str) -> Outcome:
        found = self.decided(what)
        assert found, f"no decision about {what}; have {[o.what for o in self.outcomes]}"
        return found[-1]


@pytest.fixture(name="host")
def host_fixture(xenstored: SandboxXenstored) -> Iterator[Harness]:
    """Fixture ``host``: a booted sandbox host; its daemon (if started) is stopped after the
    test. A test module gets it with ``from daemon_helpers import host_fixture``."""
    h = Harness.boot(xenstored)
    try:
        yield h
    finally:
        pytest_twisted.blockon(defer.ensureDeferred(h.stop()))
