"""``shyped demo``: the daemon as in production against a sandbox host, and a scripted scenario.

A private sandbox oxenstored (`shyped.sandbox.xenstored`) stands in for the host's xenstored;
the daemon is the production `Daemon` on ``conf/shyped.toml`` with three overrides (the
sandbox's socket, ``actuator.kind = "sandbox"`` so vetoes run the sandbox's xl-compatible CLI
as a child process, and a 2 s device close timeout), the example policy
``conf/policies/hosting.toml`` and the assignments in ``conf/labels.json``. A worker thread
plays the operator and the guests through the sandbox toolstack (``xl create -p``, unpause
after admission, hot-plug, vchans, destroy) and waits for the daemon to settle after each
step. Each decision is printed as the daemon takes it; a summary follows, and the exit status
is 1 if any decision differed from what the scenario expects.
"""

from __future__ import annotations

import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import threads
from twisted.internet.defer import Deferred

from shyped.core.engine import Outcome
from shyped.service.config import ActuatorConfig, Config, ConfigError, load_config


def _conf() -> Path:
    """conf/ of the checkout, or the copy an installed wheel carries (shyped/_data)."""
    from shyped.cli.installdata import DataMissing, data_root

    try:
        return data_root() / "conf"
    except DataMissing:
        return Path(__file__).resolve().parents[2] / "conf"


CONF = _conf()

#: Where the scenario's guests keep their disks (labelled in conf/labels.json).
IMAGES = "/srv/xen/images"


def _cfg(name: str, *, vifs: tuple[str, ...] = (), disks: tuple[str, ...] = ()) -> Any:
    from shyped.core.xlcfg import domain_config_from_text

    n = sum(ord(c) * (i + 1) for i, c in enumerate(name))
    lines = [
        f'name = "{name}"',
        f'uuid = "d3a0c0de-0000-4000-8000-{n:012x}"',
        "memory = 256",
        'kernel = "/guest/vmlinuz"',
    ]
    if vifs:
        lines.append("vif = [" + ", ".join(f"'{v}'" for v in vifs) + "]")
    if disks:
        lines.append("disk = [" + ", ".join(f"'{d}'" for d in disks) + "]")
    return domain_config_from_text("\n".join(lines) + "\n", f"{name}.cfg")


def _disk(image: str, vdev: str = "xvda", access: str = "rw") -> str:
    return f"format=raw,vdev={vdev},access={access},target={IMAGES}/{image}.img"


@attrs.define
class _Printer:
    """Serialises output from the reactor (decisions) and the scenario thread (narration)."""

    lock: threading.Lock = attrs.field(factory=threading.Lock)

    def __call__(self, text: str = "") -> None:
        with self.lock:
            print(text, flush=True)


def decision_text(o: Outcome) -> str:
    d = o.decision
    text = f"  {d.verdict:<6} {o.what}  {o.parties()}\n         [{d.rule}] {d.reason}"
    vetoes = [a.describe() for a in o.actions if type(a).__name__ != "WriteLabel"]
    if vetoes:
        text += "\n         -> " + "; ".join(vetoes)
    elif o.planned:
        text += f"\n         ({o.note})"
    return text


class Scenario:
    """The operator's side: runs in a worker thread, blocking on the toolstack and the daemon."""

    def __init__(self, ts: Any, daemon: Any, reactor: Any, say: Callable[[str], None]) -> None:
        self.ts = ts
        self.daemon = daemon
        self.reactor = reactor
        self.say = say
        self.seen: queue.Queue[Outcome] = queue.Queue()
        self.step_outcomes: list[Outcome] = []
        self.all: list[Outcome] = []
        self.surprises: list[str] = []
        self.n = 0

    def settle(self) -> list[Outcome]:
        from twisted.internet.threads import blockingCallFromThread

        blockingCallFromThread(self.reactor, self.daemon.settled)
        return self.drain()

    def drain(self) -> list[Outcome]:
        """The decisions seen since the last call."""
        got: list[Outcome] = []
        while True:
            try:
                got.append(self.seen.get_nowait())
            except queue.Empty:
                break
        self.all.extend(got)
        return got

    def step(self, title: str) -> None:
        self.n += 1
        self.say(f"\n== {self.n}. {title}")

    def expect(self, got: list[Outcome], what: str, allowed: bool) -> Outcome | None:
        for o in got:
            if o.what == what:
                if o.allowed != allowed:
                    self.surprises.append(f"{what}: expected {'permit' if allowed else 'deny'}")
                return o
        self.surprises.append(f"{what}: no decision seen")
        return None

    def run(self) -> None:
        ts, say = self.ts, self.say
        doms: dict[str, int] = {}

        self.step("web-a1 (bank A's web server) is created paused: vif on xenbr-bank-a, its disk")
        doms["web-a1"] = d = ts.create(
            _cfg("web-a1", vifs=("bridge=xenbr-bank-a",), disks=(_disk("web-a1"),))
        )
        got = self.settle()
        if self.expect(got, f"domain {d}", True):
            ts.unpause(d)
            say("  .. admitted: unpaused (as the xl wrapper does); its frontends connect")
        self.expect(got, f"device vif {d}/0", True)
        self.expect(got, f"device vbd {d}/51712", True)
        self.settle()

        self.step("shop-1 (a public web shop) is created: vif on xenbr-public, its disk")
        doms["shop-1"] = s = ts.create(
            _cfg("shop-1", vifs=("bridge=xenbr-public",), disks=(_disk("shop-1"),))
        )
        got = self.settle()
        if self.expect(got, f"domain {s}", True):
            ts.unpause(s)
            say("  .. admitted: unpaused")
        self.settle()

        self.step("web-b1 (bank B, a competitor of bank A) is created while web-a1 runs")
        b = ts.create(_cfg("web-b1", disks=(_disk("web-b1"),)))
        got = self.settle()
        self.expect(got, f"domain {b}", False)
        gone = all(dom.name != "web-b1" for dom in ts.list_domains())
        say(f"  .. web-b1 {'destroyed: not in xl list' if gone else 'STILL PRESENT'}")
        if not gone:
            self.surprises.append("web-b1 was not destroyed")

        self.step("shop-1 hot-plugs a vif served by web-a1 (a bank domain as its net backend)")
        from shyped.core.xlcfg import parse_disk_spec, parse_vif_spec

        ts.attach_nic(s, parse_vif_spec(f"bridge=xenbr-public,backend={d}"))
        say("  .. (a simulated backend only reacts while a toolstack command runs; if it does")
        say("     not close, the daemon removes the device after its close timeout, as libxl")
        say("     forces after 10 s)")
        got = self.settle()
        self.expect(got, f"device vif {s}/1", False)

        self.step("web-a1 hot-plugs bank B's disk image (labelled bank-b-disk)")
        ts.attach_disk(d, parse_disk_spec(_disk("web-b1", vdev="xvdb")))
        got = self.settle()
        self.expect(got, f"device vbd {d}/51728", False)

        self.step("vchans: dom0 serves web-a1 (permitted), web-a1 serves shop-1 (denied)")
        ok = ts.vchan_listen(0, d)
        bad = ts.vchan_listen(d, s)
        got = self.settle()
        self.expect(got, f"vchan {ok.path}", True)
        self.expect(got, f"vchan {bad.path}", False)

        self.step("web-a1 and shop-1 are shut down; web-b1 may now start")
        ts.destroy(s)
        ts.destroy(d)
        self.settle()
        b2 = ts.create(_cfg("web-b1", disks=(_disk("web-b1"),)))
        got = self.settle()
        if self.expect(got, f"domain {b2}", True):
            ts.unpause(b2)
            say("  .. admitted: bank A's Chinese Wall types were released")
        self.settle()

    def summary(self) -> str:
        permits = sum(1 for o in self.all if o.allowed)
        denies = len(self.all) - permits
        vetoes = sum(1 for o in self.all if o.enforced)
        lines = [
            "\n== summary",
            f"  {len(self.all)} decisions: {permits} permit, {denies} deny; {vetoes} vetoes "
            "carried out",
        ]
        for o in self.all:
            if not o.allowed:
                lines.append(f"  deny   {o.what:<44} [{o.decision.rule}]")
        lines.append("  xl list:")
        for dom in self.ts.list_domains():
            state = "running" if dom.domid == 0 or not dom.paused else "paused"
            lines.append(f"    {dom.name:<12} {dom.domid:>3}  {state}")
        if self.surprises:
            lines.append("  UNEXPECTED: " + "; ".join(self.surprises))
        else:
            lines.append("  every decision was the expected one")
        return "\n".join(lines)


def demo_config(socket: Path, conf: Path = CONF) -> Config:
    """conf/shyped.toml pointed at the sandbox (see the module docstring)."""
    base = load_config(conf / "shyped.toml")
    return attrs.evolve(
        base,
        xenstore=attrs.evolve(base.xenstore, socket=socket),
        actuator=ActuatorConfig(kind="sandbox", timeout=base.actuator.timeout),
        device_close_timeout=2.0,
    )


def run_demo(*, verbose: bool = False, conf: Path = CONF) -> int:
    """Run the scenario; 0 if every decision was the expected one."""
    from shyped.cli.logs import start_logging
    from shyped.sandbox.toolstack import Toolstack
    from shyped.sandbox.xenstored import SandboxXenstored, short_instance_dir
    from shyped.service.daemon import Daemon, StartupError, load_startup

    say = _Printer()
    if not (conf / "shyped.toml").is_file():
        print(f"shyped demo: {conf}/shyped.toml not found", file=sys.stderr)
        return 2
    directory = short_instance_dir("shyped-demo")
    xsd = SandboxXenstored(directory)
    try:
        xsd.start()
    except Exception as e:
        shutil.rmtree(directory, ignore_errors=True)
        print(f"shyped demo: cannot start the sandbox xenstored: {e}", file=sys.stderr)
        return 1
    try:
        config = demo_config(xsd.socket_path, conf)
        loaded, labels = load_startup(config)
        ts = Toolstack(xsd.socket_path)
        ts.boot_host()
        if verbose:
            start_logging("info")
        else:
            start_logging("warn", open(directory / "shyped.log", "w"))  # noqa: SIM115
        return _run(config, loaded, labels, ts, say, Daemon)
    except (ConfigError, StartupError) as e:
        print(f"shyped demo: {e}", file=sys.stderr)
        return 2
    finally:
        xsd.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _run(config: Config, loaded: Any, labels: Any, ts: Any, say: _Printer, daemon_cls: Any) -> int:
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    p = loaded.policy
    say(
        f"shyped demo: sandbox oxenstored at {config.xenstore.socket}\n"
        f"  policy {p.name} {p.version} ({config.policy}), labels {config.labels}\n"
        f"  mode {config.mode.value}, domain veto {config.domain_veto.value}, vetoes through "
        f"the sandbox's xl-compatible CLI"
    )
    daemon = daemon_cls(config, loaded, labels, reactor=reactor)
    scenario = Scenario(ts, daemon, reactor, say)

    def show(outcome: Outcome) -> None:
        scenario.seen.put(outcome)
        say(decision_text(outcome))

    daemon.add_listener(show)
    result = {"code": 1}
    started = time.monotonic()

    async def main() -> None:
        try:
            await daemon.start()
            say("\n== 0. the daemon started: dom0 runs with the bootstrap label")
            await daemon.settled()
            scenario.drain()
            await threads.deferToThread(scenario.run)
            say(scenario.summary())
            say(f"  ({time.monotonic() - started:.1f} s)")
            result["code"] = 1 if scenario.surprises else 0
        finally:
            await daemon.stop()
            reactor.stop()

    def go() -> None:
        d = Deferred.fromCoroutine(main())
        d.addErrback(lambda f: say(f"shyped demo failed: {f.getTraceback()}"))

    reactor.callWhenRunning(go)
    reactor.run(installSignalHandlers=True)
    return result["code"]
