"""One guest's write flood against another domain's admission decision (red-team finding B).

On a sandbox oxenstored with the daemon (enforcing, sandbox actuator): ``web-a1`` (bank-a) runs;
a rival ``web-b1`` (bank-b, in conflict) is created again and again and vetoed by the Chinese
Wall (destroyed). One sample: from just before the toolstack's ``create`` of the rival to the
daemon's decision listener seeing its veto (admission to veto). Rounds alternate without and
with a flood: ``--writers`` processes, each with its own xenstore connection, writing in
web-a1's ``data/`` as fast as they can (``fN-i/ring-ref``: write, SET_PERMS owner-only,
remove, new name each time), as the red team did. Reported: p50 / max of both, the flood's
rate, and the ratio flood / quiet (measured in the same run), for two spans: from the
toolstack's ``create`` (includes the toolstack's own transactions, which queue behind the
flood in xenstored) and from the daemon's first watch event about the rival (its ``/vm``: the
daemon's own share, what the fairness of its batches bounds).

Run: .venv/bin/python benchmarks/bench_guest_flood.py [--samples 10] [--writers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, task, threads

from shyped.core.engine import Outcome
from shyped.core.labelstore import LabelStore
from shyped.core.xlcfg import DomainConfig, domain_config_from_text
from shyped.sandbox.toolstack import Toolstack
from shyped.sandbox.xenstored import SandboxXenstored, short_instance_dir
from shyped.sandbox.xsconn import XsConn, XsError
from shyped.service.actuator import SandboxActuator
from shyped.service.config import ActuatorConfig, Config, XenstoreConfig
from shyped.service.daemon import Daemon, load_policy
from shyped.xenstore import GatewayConfig, XenstoreGateway

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "conf" / "policies" / "hosting.toml"


def cfg(name: str, n: int) -> DomainConfig:
    return domain_config_from_text(
        f'name = "{name}"\nuuid = "00000000-0000-4000-8000-{n:012x}"\nmemory = 128\n'
    )


def _write(socket_path: str, domid: int, n: int, stop: Any, ops: Any) -> None:
    """One writer process (its own interpreter: the flood does not share the daemon's GIL)."""
    perms = (f"n{domid}",)
    i = 0
    with XsConn(socket_path) as xs:
        while not stop.is_set():
            path = f"/local/domain/{domid}/data/f{n}-{i}/ring-ref"
            try:
                xs.write(path, str(i))
                xs.set_perms(path, perms)
                xs.rm(path.rsplit("/", 1)[0])
            except XsError:  # xenstored too busy to answer in time: the flood goes on
                continue
            finally:
                i += 1
            if i % 64 == 0:
                with ops.get_lock():
                    ops.value += 3 * 64


class Flood:
    """Writer processes in one guest's data/ until stopped; counts their operations."""

    def __init__(self, socket_path: str, domid: int, writers: int) -> None:
        self.socket_path, self.domid, self.writers = socket_path, domid, writers
        self._ctx = multiprocessing.get_context("spawn")
        self._ops = self._ctx.Value("q", 0)
        self._stop = self._ctx.Event()
        self._procs: list[Any] = []
        self._started = 0.0
        self.seconds = 0.0

    @property
    def ops(self) -> int:
        return int(self._ops.value)

    def __enter__(self) -> Flood:
        self._stop.clear()
        self._started = time.perf_counter()
        self._procs = [
            self._ctx.Process(
                target=_write,
                args=(self.socket_path, self.domid, n, self._stop, self._ops),
                daemon=True,
            )
            for n in range(self.writers)
        ]
        for p in self._procs:
            p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for p in self._procs:
            p.join()
        self.seconds += time.perf_counter() - self._started


Seen = list[tuple[float, Outcome]]


RIVAL_VM = "/vm/00000000-0000-4000-8000-0000000000b1"


def watch_rival(daemon: Daemon, first: dict[str, float]) -> None:
    """Note when the daemon's watch callback first sees the rival's ``/vm`` (before start)."""
    on_event = daemon._on_event

    def spy(path: str, token: str) -> None:
        if path.startswith(RIVAL_VM):
            first.setdefault("event", time.perf_counter())
        on_event(path, token)

    daemon._on_event = spy  # type: ignore[method-assign]


async def sample(
    reactor: Any, daemon: Daemon, ts: Toolstack, seen: Seen, first: dict[str, float]
) -> tuple[float, float]:
    """Create the rival; seconds until its veto from the create and from the daemon's first
    watch event about it; then wait until it is gone."""
    before = len(seen)
    first.clear()
    t0 = time.perf_counter()
    domid = await threads.deferToThread(ts.create, cfg("web-b1", 0xB1))
    what = f"domain {domid}"
    while not any(o.what == what and not o.allowed for _, o in seen[before:]):
        await task.deferLater(reactor, 0.001, lambda: None)
    vetoed = next(t for t, o in seen[before:] if o.what == what)
    while any(d.name == "web-b1" for d in ts.list_domains()) or not daemon.enforcer.idle():
        await task.deferLater(reactor, 0.005, lambda: None)
    return vetoed - t0, vetoed - first["event"]


async def bench(reactor: Any, samples: int, writers: int) -> dict[str, Any]:
    directory = short_instance_dir("bench-flood")
    xsd = SandboxXenstored(directory)
    xsd.start()
    try:
        ts = Toolstack(xsd.socket_path)
        ts.boot_host()
        a = ts.create(cfg("web-a1", 0xA1))
        store = LabelStore().with_domain(name="web-a1", label="bank-a-web")
        store = store.with_domain(name="web-b1", label="bank-b-web")
        config = Config(
            policy=POLICY,
            xenstore=XenstoreConfig(socket=xsd.socket_path),
            actuator=ActuatorConfig(kind="sandbox"),
        )
        daemon = Daemon(
            config,
            load_policy(POLICY),
            store,
            gateway=XenstoreGateway(GatewayConfig(socket_path=str(xsd.socket_path))),
            actuator=SandboxActuator(ts.pause, ts.unpause, ts.destroy),
        )
        seen: Seen = []
        daemon.add_listener(lambda o: seen.append((time.perf_counter(), o)))
        first: dict[str, float] = {}
        watch_rival(daemon, first)
        await daemon.start()
        await daemon.settled()
        quiet: list[tuple[float, float]] = []
        flooded: list[tuple[float, float]] = []
        flood = Flood(str(xsd.socket_path), a, writers)
        for _ in range(samples):
            quiet.append(await sample(reactor, daemon, ts, seen, first))
            with flood:
                await task.deferLater(reactor, 1.0, lambda: None)  # the flood is under way
                flooded.append(await sample(reactor, daemon, ts, seen, first))
            await daemon.settled()  # the backlog drains before the next quiet sample
        await daemon.stop()
    finally:
        xsd.stop()
        shutil.rmtree(directory, ignore_errors=True)
    out: dict[str, Any] = {
        "samples": samples,
        "writers": writers,
        "flood_ops_per_s": flood.ops / flood.seconds if flood.seconds else 0.0,
    }
    for i, span in enumerate(("create", "event")):
        q = [x[i] * 1e3 for x in quiet]
        f = [x[i] * 1e3 for x in flooded]
        q50, f50 = statistics.median(q), statistics.median(f)
        out[span] = {
            "quiet_p50_ms": q50,
            "quiet_max_ms": max(q),
            "flood_p50_ms": f50,
            "flood_max_ms": max(f),
            "ratio_p50": f50 / q50,
            "ratio_max": max(f) / max(q),
        }
    return out


def report(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"rival admission -> veto, {result['samples']} samples each; flood "
        f"{result['writers']} writers, {result['flood_ops_per_s']:.0f} ops/s"
    )
    for span, title in (("create", "from create"), ("event", "from 1st event")):
        r = result[span]
        print(
            f"  {title:15s} quiet p50 {r['quiet_p50_ms']:7.1f} ms max {r['quiet_max_ms']:7.1f}"
            f" | flood p50 {r['flood_p50_ms']:7.1f} ms max {r['flood_max_ms']:7.1f}"
            f" | ratio p50 {r['ratio_p50']:5.2f}x max {r['ratio_max']:5.2f}x"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10, help="rival creations per mode")
    parser.add_argument("--writers", type=int, default=2, help="flood writer processes")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)

    async def run(reactor: Any) -> None:
        report(await bench(reactor, args.samples, args.writers), args.json)

    # Runs the reactor until `run` is done; exits 1 with the traceback if it failed.
    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
