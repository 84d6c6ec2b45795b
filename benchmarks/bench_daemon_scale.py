"""The daemon at scale: cold start ÷ bare walk, admission cost 5,000 ÷ 10, RSS per domain.

One sandbox oxenstored per host size N (``--sizes``, default 0,10,1000,5000): the sandbox
toolstack creates N labelled domains (each a vif, a vbd and a console), then, ``--rounds``
times and interleaved (this tree, baseline, baseline, this, ...), a child process per tree
under test (``PYTHONPATH`` set to that tree) runs:

* **bare walk**: the fastest of ``--walks`` (3) snapshots of ``/`` (values and children, no
  permissions, the tree's own ``XenstoreGateway.snapshot``) by a fresh gateway: the cold
  start's floor;
* **daemon**: a `Daemon` started on that tree; **cold start** is ``start()`` to everything
  decided and every label node written (goal ÷ bare walk ≤ 1.5); then **admission cost**: a
  writer process commits libxl's domain-creation transaction for a labelled domain and times
  until a raw watcher sees the label node the daemon writes (``--admissions`` samples, p50;
  goal 5,000 ÷ 10 domains ≤ 1.1); **RSS**: the child's resident set after start (after
  ``gc.collect()``) minus before it, per domain (goal ≤ 16 KiB), and the peak (``VmHWM``)
  over the same interval, per domain.

The label nodes the daemon wrote are removed between children, so every start decides the
same host. Each row gives the median over the rounds and its spread (min-max), and, with a
baseline, this ÷ baseline. Nothing is asserted about time: it is a measurement.

Baseline: ``--baseline-ref REF`` (a git ref of this repository, checked out with
``git worktree add --detach`` into a temporary directory and removed after) or ``--baseline
DIR`` (any tree holding ``shyped/``, e.g. an installed copy's parent directory).
``--tracemalloc K`` prints, for the largest N and this tree, the K biggest allocation sites
still held after the start, each grouped by its innermost 6 frames (slow; a diagnosis, not a
measurement). A child that runs over 30 minutes is taken as hung (a wedged xenstore
connection): it is killed and the run stops saying so.

Run: .venv/bin/python benchmarks/bench_daemon_scale.py --baseline-ref main [--sizes
0,10,1000,5000] [--rounds 3] [--json]. The default run takes several minutes on a loaded
2-core machine (the toolstack creating the 6,010 domains, and 5,000-domain cold starts).
CI-cheap: ``--quick`` (sizes 0,10,200, one round, 5 admissions; asserts only that every
domain was admitted; some 25 seconds without a baseline).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# ----------------------------------------------------------------------------- child side


def _rss_kib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = float(line.split()[1])
    return out["VmRSS"], out["VmHWM"]


def _reset_hwm() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _child_walk(socket_path: str, walks: int) -> dict[str, float]:
    sys.path.insert(0, str(HERE))
    from bench_daemon import bare_walk
    from twisted.internet import defer, reactor

    out: dict[str, float] = {}

    async def run() -> None:
        out["walk_s"] = await bare_walk(socket_path, walks)

    _run_reactor(reactor, defer, run)
    return out


def _run_reactor(reactor: Any, defer: Any, run: Any) -> None:
    failure: list[Any] = []

    def go() -> None:
        d = defer.ensureDeferred(run())
        d.addErrback(failure.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    if failure:
        failure[0].raiseException()


def _admit(socket_path: str, count: int) -> list[float]:
    """`count` admissions of the probe domain by bench_daemon's writer process, each undone."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "bench_daemon.py"), "_writer", socket_path, "1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    out: list[float] = []
    try:
        for _ in range(count):
            proc.stdin.write("admit\n")
            proc.stdin.flush()
            t0, seen = (float(x) for x in proc.stdout.readline().split())
            out.append(seen - t0)
            proc.stdin.write("undo admit\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "ok\n"
            time.sleep(0.02)  # let the daemon see the removal before the next sample
    finally:
        proc.stdin.close()
        proc.wait(10)
    return out


#: Frames kept per allocation by ``--tracemalloc`` (its sites are grouped by these frames).
_TRACE_FRAMES = 6
#: A child taking longer than this has hung (e.g. a wedged xenstore connection): it is
#: killed and the run fails saying so, rather than waiting for ever.
_CHILD_TIMEOUT_S = 1800


def _child_daemon(socket_path: str, n: int, admissions: int, trace: int) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from bench_daemon import POLICY, NoActuator, labels
    from twisted.internet import defer, reactor, threads
    from twisted.logger import globalLogBeginner

    from shyped.service import daemon as daemon_mod
    from shyped.service.config import ActuatorConfig, Config, XenstoreConfig
    from shyped.service.daemon import Daemon, load_policy
    from shyped.xenstore import GatewayConfig, XenstoreGateway

    out: dict[str, Any] = {}
    # As the daemon's entry point does, log somewhere (a sink here): until logging begins,
    # Twisted keeps every log event in memory, which would count as the daemon's.
    globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)

    async def run() -> None:
        cfg = Config(
            policy=POLICY,
            xenstore=XenstoreConfig(socket=Path(socket_path)),
            actuator=ActuatorConfig(kind="sandbox"),
        )
        store = labels(n)
        policy = load_policy(cfg.policy)
        gateway = XenstoreGateway(GatewayConfig(socket_path=socket_path))
        daemon = Daemon(cfg, policy, store, gateway=gateway, actuator=NoActuator())
        admitted: list[int] = []
        daemon.add_listener(
            lambda o: admitted.append(1) if o.kind == "domain" and o.allowed else None
        )
        gc.collect()
        rss0, _ = _rss_kib()
        _reset_hwm()
        if trace:
            import tracemalloc

            tracemalloc.start(_TRACE_FRAMES)
        t = time.perf_counter()
        await daemon.start()
        await daemon.settled()
        out["cold_s"] = time.perf_counter() - t
        # what the daemon's entry point does once started (absent from older trees)
        getattr(daemon_mod, "freeze_after_start", gc.collect)()
        rss1, hwm = _rss_kib()
        out["rss_kib"] = rss1 - rss0
        out["peak_kib"] = hwm - rss0
        t = time.perf_counter()
        gc.collect()  # what a full collection costs now (e.g. during the first scrape)
        out["gc_ms"] = (time.perf_counter() - t) * 1e3
        out["admitted"] = len(admitted)
        if trace:
            import tracemalloc

            snap = tracemalloc.take_snapshot()
            cur, peak = tracemalloc.get_traced_memory()
            out["traced_kib"] = cur / 1024
            out["traced_peak_kib"] = peak / 1024
            tracemalloc.stop()
            top = snap.statistics("traceback")[:trace]
            out["tracemalloc"] = [
                f"{s.size / 1024:9.1f} KiB {s.count:8}  "
                + " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(s.traceback))
                for s in top
            ]
        if admissions:
            samples = await threads.deferToThread(_admit, socket_path, admissions)
            out["admit_p50_us"] = statistics.median(samples) * 1e6
        await daemon.stop()

    _run_reactor(reactor, defer, run)
    return out


# ----------------------------------------------------------------------------- parent side


def _child(tree: Path, *args: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", *args]
    try:
        res = subprocess.run(
            cmd,
            env=env,
            check=True,
            capture_output=True,
            text=True,
            cwd=tree,
            timeout=_CHILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        raise SystemExit(f"{tree}: child {args[0]} hung ({_CHILD_TIMEOUT_S} s), killed") from e
    return dict(json.loads(res.stdout.splitlines()[-1]))


@contextlib.contextmanager
def baseline_tree(ref: str) -> Iterator[Path]:
    """A detached git worktree of `ref` in a temporary directory (removed after)."""
    tmp = Path(tempfile.mkdtemp(prefix="shyped-base-"))
    where = tmp / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(where), ref],
        check=True,
    )
    try:
        yield where
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], check=False
        )
        shutil.rmtree(tmp, ignore_errors=True)


def _populate(n: int) -> tuple[Any, Path, list[int]]:
    from bench_daemon import shop, toolstack

    from shyped.core.xlcfg import domain_config_from_text
    from shyped.sandbox.xenstored import SandboxXenstored, short_instance_dir

    directory = short_instance_dir("bench-scale")
    xsd = SandboxXenstored(directory)
    xsd.start()
    ts = toolstack(xsd)
    ts.boot_host()
    web = domain_config_from_text(
        'name = "web-a1"\nuuid = "00000000-0000-4000-8000-0000000000a1"\n'
    )
    domids = [ts.create(web)]
    domids.extend(ts.create(shop(i)) for i in range(n))
    return xsd, directory, domids


def _clear_labels(socket_path: str, domids: list[int]) -> None:
    """Remove the label nodes a daemon wrote, so that the next start decides the same host."""
    from shyped.xenstore.errors import NoEntry
    from shyped.xenstore.rawclient import RawClient

    with RawClient(socket_path) as conn:
        for d in domids:
            with contextlib.suppress(NoEntry):
                conn.rm(b"/local/domain/%d/shyped" % d)


def measure(
    sizes: list[int], trees: dict[str, Path], rounds: int, admissions: int, trace: int, walks: int
) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    samples: dict[str, dict[int, dict[str, list[float]]]] = {name: {} for name in trees}
    traces: list[str] = []
    for n in sizes:
        xsd, directory, domids = _populate(n)
        sock = str(xsd.socket_path)
        try:
            order = list(trees)
            for r in range(rounds):
                for name in order if r % 2 == 0 else order[::-1]:
                    row = samples[name].setdefault(n, {})
                    walk = _child(trees[name], "walk", sock, str(walks))
                    got = _child(trees[name], "daemon", sock, str(n), str(admissions), "0")
                    _clear_labels(sock, domids)
                    if got["admitted"] != n + 1:
                        raise SystemExit(f"{name} at {n}: {got['admitted']} of {n + 1} admitted")
                    got.update(walk)
                    for key, value in got.items():
                        if isinstance(value, float | int):
                            row.setdefault(key, []).append(float(value))
            if trace and n == max(sizes):
                got = _child(trees["this"], "daemon", sock, str(n), "0", str(trace))
                _clear_labels(sock, domids)
                traces = got.get("tracemalloc", [])
        finally:
            xsd.stop()
            shutil.rmtree(directory, ignore_errors=True)
    return {"samples": samples, "tracemalloc": traces}


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def _cell(xs: list[float], fmt: str) -> str:
    return f"{_med(xs):{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"


def report(result: dict[str, Any], sizes: list[int]) -> None:
    samples = result["samples"]
    names = list(samples)
    print("cold start ÷ bare walk (goal <= 1.5); cold start s; walk s   median (min-max)")
    for n in sizes:
        if n == 0:
            continue
        for name in names:
            s = samples[name][n]
            ratio = [c / w for c, w in zip(s["cold_s"], s["walk_s"], strict=True)]
            print(
                f"  {n:>5} {name:5}  {_cell(ratio, '.2f')}   cold {_cell(s['cold_s'], '.3f')}"
                f"   walk {_cell(s['walk_s'], '.3f')}"
            )
    print("RSS growth over the start, KiB per domain (goal <= 16); peak (VmHWM) per domain")
    for n in sizes:
        for name in names:
            s = samples[name][n]
            if n == 0:
                print(
                    f"  {n:>5} {name:5}  growth {_cell(s['rss_kib'], '.0f')} KiB"
                    f"   peak {_cell(s['peak_kib'], '.0f')} KiB"
                )
                continue
            per = [x / n for x in s["rss_kib"]]
            peak = [x / n for x in s["peak_kib"]]
            print(f"  {n:>5} {name:5}  {_cell(per, '.1f')}   peak {_cell(peak, '.1f')}")
    with_admit = [n for n in sizes if "admit_p50_us" in samples[names[0]].get(n, {})]
    if len(with_admit) >= 2:
        lo = min(n for n in with_admit if n > 0)
        print(f"admission p50 µs (commit -> label node seen) and N ÷ {lo} (goal 5,000 ÷ 10 <= 1.1)")
        for n in with_admit:
            for name in names:
                a = samples[name][n]["admit_p50_us"]
                base = _med(samples[name][lo]["admit_p50_us"])
                print(f"  {n:>5} {name:5}  {_cell(a, '.0f')} µs   ÷{lo}: {_med(a) / base:.2f}")
    print("a full gc.collect() after the start, ms")
    for n in sizes:
        print(
            f"  {n:>5}  " + "   ".join(f"{m} {_cell(samples[m][n]['gc_ms'], '.1f')}" for m in names)
        )
    if "base" in samples:
        print("this ÷ base (medians)")
        for n in sizes:
            t, b = samples["this"][n], samples["base"][n]
            parts = [
                f"{k} {_med(t[k]) / _med(b[k]):.2f}"
                for k in ("cold_s", "walk_s", "rss_kib", "peak_kib", "admit_p50_us", "gc_ms")
                if k in t and _med(b[k]) > 0
            ]
            print(f"  {n:>5}  " + "  ".join(parts))
    for line in result.get("tracemalloc", []):
        print("  " + line)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", default="0,10,1000,5000", help="host sizes (domains)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--admissions", type=int, default=30, help="admissions per daemon run")
    parser.add_argument("--baseline", type=Path, help="a tree holding shyped/ (the baseline)")
    parser.add_argument("--baseline-ref", help="a git ref: its worktree is the baseline")
    parser.add_argument("--walks", type=int, default=3, help="bare walks per child (fastest)")
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="K")
    parser.add_argument("--quick", action="store_true", help="0,10,200 domains, one round")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds, args.admissions = "0,10,200", 1, 5
    sizes = sorted({int(x) for x in args.sizes.split(",") if x})
    with contextlib.ExitStack() as stack:
        trees = {"this": ROOT}
        if args.baseline_ref:
            trees["base"] = stack.enter_context(baseline_tree(args.baseline_ref))
        elif args.baseline is not None:
            trees["base"] = args.baseline.resolve()
        t = time.perf_counter()
        result = measure(sizes, trees, args.rounds, args.admissions, args.tracemalloc, args.walks)
        result["wall_s"] = time.perf_counter() - t
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result, sizes)
        print(f"({result['wall_s']:.0f} s)")
    return 0


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(f"signal {signum}")  # so that the sandbox and the worktree are removed


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminated)
    if sys.argv[1:2] == ["_child"]:
        kind, sock = sys.argv[2], sys.argv[3]
        if kind == "walk":
            res = _child_walk(sock, int(sys.argv[4]))
        else:
            n, adm, trace = (int(x) for x in sys.argv[4:7])
            res = _child_daemon(sock, n, adm, trace)
        print(json.dumps(res))
    else:
        sys.exit(main())
