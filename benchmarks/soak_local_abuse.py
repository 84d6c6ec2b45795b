"""Soak: the daemon under local abuse beside a normal workload, as a ratio to no abuse.

A sandbox host (real oxenstored, the sandbox toolstack, the real daemon as a child process
with its control socket, audit trail and metrics endpoint) runs a normal workload while
unprivileged local users -- real users created for the run (useradd; removed after) and run
with setpriv -- attack it. Each round of the workload:

1. creates ``web-a1`` (bank-a, a disk and a vif): its **admission** latency ends when the
   daemon's label node appears in xenstore;
2. creates ``web-b1`` (bank-b: the Chinese Wall refuses it while web-a1 runs): its **veto**
   latency ends when the daemon has destroyed it;
3. has web-a1 offer a vchan to ``shop-1`` (no common STE type): its **vchan** latency ends
   when the daemon has removed the rendezvous;
4. destroys web-a1.

Every latency runs from the toolstack call's start (the toolstack's own time is included in
both phases). The workload runs twice, ``--seconds`` each: without load, then with the load.

Loads (``--load``): ``control-flood`` -- an outsider (no shyped group) floods the control
socket: refused ``setenforce`` requests, garbage lines on connections whose answers are never
read, and as many held connections as it can open; ``policy-check`` -- read-group members
send pathological policies (62 KB of dotted keys, 5,000 nested arrays) to ``policy_check``
from 8 connections in parallel, over and over; ``metrics-fds`` -- an outsider opens and holds
as many TCP connections to the metrics port as it can; ``all`` -- the three at once.

Reported per phase: daemon RSS before/after (VmRSS), its open descriptors (before / at the
end of the workload), its CPU (and the load's) in cores, the read group's ``list`` answers (a
read-group member asks every 0.2 s: ok / busy / other errors, latency p50/p99), audit
records added per second, and the workload's latencies p50/p99; with load, each p50/p99 as a
ratio to the phase without load.

Run as root (useradd, setpriv): .venv/bin/python benchmarks/soak_local_abuse.py
[--seconds 60] [--load control-flood|policy-check|metrics-fds|all] [--json].
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' sandbox-host and real-user helpers

from control_daemon_helpers import Host, image, sandbox_host  # noqa: E402
from peercred_helpers import Accounts, spawn_as, system_accounts  # noqa: E402

from shyped.core.xlcfg import domain_config_from_text  # noqa: E402
from shyped.sandbox.xenstored import SandboxXenstored, short_instance_dir  # noqa: E402
from shyped.sandbox.xsconn import XsConn  # noqa: E402

LOADS = ("control-flood", "policy-check", "metrics-fds", "all")

# --------------------------------------------------------------------------- load generators
# stdlib-only scripts run by /usr/bin/python3 under setpriv; they run until stdin closes.

_UNTIL_STDIN = r"""
import os, sys, threading
def _watch():
    sys.stdin.read()
    os._exit(0)
threading.Thread(target=_watch, daemon=True).start()
"""

CONTROL_FLOOD = (
    _UNTIL_STDIN
    + r"""
import json, socket, time
path = sys.argv[1]
def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s
def refused():
    line = b'{"version": 1, "op": "setenforce", "args": {"mode": "permissive"}}\n'
    while True:
        try:
            s = conn(); f = s.makefile("rb")
            while True:
                s.sendall(line)
                if not f.readline():
                    break
        except OSError:
            time.sleep(0.05)
def garbage():
    while True:
        try:
            s = conn()
            while True:
                s.sendall(b"x\n" * 4096)
        except OSError:
            time.sleep(0.05)
def hold():
    held = []
    while True:
        try:
            held.append(conn())
        except OSError:
            time.sleep(0.05)
        if len(held) > 256:
            held.pop(0).close()
kinds = os.environ.get("SOAK_FLOOD", "refused,refused,garbage,garbage,hold").split(",")
for fn in kinds:
    threading.Thread(target=globals()[fn], daemon=True).start()
threading.Event().wait()
"""
)

POLICY_BOMBS = (
    _UNTIL_STDIN
    + r"""
import json, socket, time
path, n = sys.argv[1], int(sys.argv[2])
dotted = "a." * 31000 + "b = 1"
nested = "x = " + "[" * 5000 + "]" * 5000
def bomb(text):
    doc = json.dumps({"version": 1, "op": "policy_check", "args": {"text": text}}).encode()
    while True:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            f = s.makefile("rb")
            while True:
                s.sendall(doc + b"\n")
                if not f.readline():
                    break
        except OSError:
            time.sleep(0.05)
for i in range(n):
    threading.Thread(target=bomb, args=(nested if i % 4 == 3 else dotted,), daemon=True).start()
threading.Event().wait()
"""
)

METRICS_FDS = (
    _UNTIL_STDIN
    + r"""
import resource, socket, time
port = int(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
while True:
    try:
        held.append(socket.create_connection(("127.0.0.1", port), timeout=2))
    except OSError:
        time.sleep(0.05)
        held = [s for s in held if s.fileno() >= 0]
"""
)

#: A read-group member asking `list` every 0.2 s on a fresh connection; prints one JSON line
#: of counts and latencies when stdin closes.
READER_PROBE = r"""
import json, os, socket, sys, threading, time
path = sys.argv[1]
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
counts = {"ok": 0, "busy": 0, "error": 0}
errors = {}
lat = []
while not stop.is_set():
    t0 = time.perf_counter()
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        while True:  # as shypectl does: EAGAIN (listen queue full) is retried for 30 s
            try:
                s.connect(path)
                break
            except BlockingIOError:
                if time.perf_counter() - t0 > 30:
                    raise
                time.sleep(0.02)
        s.sendall(b'{"version": 1, "op": "list"}\n')
        doc = json.loads(s.makefile("rb").readline())
        s.close()
        kind = "ok" if doc.get("ok") else (
            "busy" if doc.get("error", {}).get("code") == "busy" else "error")
    except (OSError, ValueError) as exc:
        kind = "error"
        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
    counts[kind] += 1
    if kind == "ok":
        lat.append(time.perf_counter() - t0)
    stop.wait(0.2)
print(json.dumps({"counts": counts, "errors": errors, "latency": lat}), flush=True)
"""


# --------------------------------------------------------------------------- measurements


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(m.group(1)) / 1024 if m else float("nan")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_s(pid: int) -> float:
    """utime + stime of `pid` (and its reaped children), seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def audit_seq(directory: Path) -> int:
    """The highest record sequence number in the audit trail (retention cannot lower it)."""
    best = 0
    for path in directory.glob("*"):
        if path.is_file():
            for m in re.finditer(rb'"seq":(\d+)', path.read_bytes()):
                best = max(best, int(m.group(1)))
    return best


def pct(samples: Sequence[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * (len(s) - 1)))] if s else float("nan")


def summary(samples: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50_ms": pct(samples, 0.5) * 1e3,
        "p99_ms": pct(samples, 0.99) * 1e3,
        "mean_ms": statistics.fmean(samples) * 1e3 if samples else float("nan"),
    }


# --------------------------------------------------------------------------- the workload


def until(xs: XsConn, path: str, *, present: bool) -> None:
    """Poll `path` (every 2 ms) until it exists (`present`) or is gone."""
    wait_for(lambda: (xs.read(path) is not None) == present)


def wait_for(predicate: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("the daemon did not act within 120 s")
        time.sleep(0.002)


def cfg(name: str, vifs: str = "") -> Any:
    return domain_config_from_text(
        f'name = "{name}"\nmemory = 128\n'
        f"disk = ['{image(name)}']\n" + (f"vif = ['bridge={vifs}']\n" if vifs else "")
    )


def workload(host: Host, seconds: float) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"admission": [], "veto": [], "vchan": []}
    ts = host.ts
    shop = next(d.domid for d in ts.list_domains() if d.name == "shop-1")
    deadline = time.monotonic() + seconds
    with XsConn(str(host.xsd.socket_path)) as xs:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            a = ts.create(cfg("web-a1", "xenbr-bank-a"), paused=False)
            until(xs, f"/local/domain/{a}/shyped/label", present=True)
            out["admission"].append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            b = ts.create(cfg("web-b1", "xenbr-bank-b"), paused=True)
            until(xs, f"/local/domain/{b}/name", present=False)
            out["veto"].append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            end = ts.vchan_listen(a, shop, port=7)
            until(xs, f"{end.path}/ring-ref", present=False)
            out["vchan"].append(time.perf_counter() - t0)

            ts.destroy(a)
            until(xs, f"/local/domain/{a}/name", present=False)
    return out


def phase(host: Host, accounts: Accounts, load: str | None, seconds: float) -> dict[str, Any]:
    assert host.daemon is not None
    pid = host.daemon.proc.pid
    audit_dir = host.directory / "audit"
    rss0, seq0, fds0 = rss_mb(pid), audit_seq(audit_dir), fds(pid)
    with ExitStack() as stack:
        loaders = start_load(host, accounts, load)
        for proc in loaders:
            stack.callback(stop, proc)
        time.sleep(2.0 if load else 0.0)  # let the load build up
        probe = spawn_as(accounts.reader, READER_PROBE, str(host.socket))
        t0 = time.monotonic()
        cpu0, load0 = cpu_s(pid), sum(cpu_s(p.pid) for p in loaders)
        lat = workload(host, seconds)
        elapsed = time.monotonic() - t0
        cpu1, load1 = cpu_s(pid), sum(cpu_s(p.pid) for p in loaders)
        fds1 = fds(pid)
        reader = json.loads(probe.communicate("", timeout=120)[0] or "{}")
        rss1 = rss_mb(pid)
    seq1 = audit_seq(audit_dir)
    return {
        "load": load or "none",
        "seconds": elapsed,
        "rss_mb": {"before": rss0, "after": rss1},
        "fds": {"before": fds0, "end": fds1},
        "reader": {
            "counts": reader.get("counts"),
            "errors": reader.get("errors"),
            **{k: v for k, v in summary(reader.get("latency", [])).items() if k != "n"},
        },
        "audit_records_per_s": (seq1 - seq0) / elapsed,
        "daemon_cpu": (cpu1 - cpu0) / elapsed,
        "load_cpu": (load1 - load0) / elapsed,
        "latency": {k: summary(v) for k, v in lat.items()},
    }


def start_load(host: Host, accounts: Accounts, load: str | None) -> list[subprocess.Popen[str]]:
    procs: list[subprocess.Popen[str]] = []
    kinds = LOADS[:3] if load == "all" else ((load,) if load else ())
    for kind in kinds:
        if kind == "control-flood":
            procs.append(spawn_as(accounts.outsider, CONTROL_FLOOD, str(host.socket)))
        elif kind == "policy-check":
            # another read-group member than the probe (its own per-uid connection cap)
            bomber, groups = accounts.outsiders[0], (accounts.read_gid,)
            procs.append(spawn_as(bomber, POLICY_BOMBS, str(host.socket), "8", groups=groups))
        elif kind == "metrics-fds":
            procs.append(spawn_as(accounts.outsider, METRICS_FDS, str(metrics_port(host))))
    return procs


def stop(proc: subprocess.Popen[str]) -> None:
    try:
        proc.communicate("", timeout=10)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def metrics_port(host: Host) -> int:
    m = re.search(r"\[metrics\][^\[]*port = (\d+)", host.config.read_text())
    assert m is not None
    return int(m.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def soak_host(accounts: Accounts) -> Iterator[Host]:
    directory = short_instance_dir()
    xsd = SandboxXenstored(directory)
    xsd.start()
    try:
        with sandbox_host(xsd) as host:
            os.chmod(host.directory, 0o755)
            token = host.directory / "metrics.token"  # root-only: the outsider has none
            token.write_text(secrets.token_hex(16) + "\n")
            token.chmod(0o600)
            host.extra = (
                f'read_group = "{accounts.read_group}"\n'
                f'admin_group = "{accounts.admin_group}"\n'
                f'[audit]\ndirectory = "{host.directory / "audit"}"\n'
                f"[metrics]\nenabled = true\nport = {free_port()}\n"
                f'bearer_token_file = "{token}"\n'
            )
            host.start()
            host.ts.create(cfg("shop-1"), paused=False)
            wait_for(lambda: host.label_node("shop-1") is not None)
            yield host
    finally:
        xsd.stop()
        shutil.rmtree(directory, ignore_errors=True)


def ratios(base: dict[str, Any], loaded: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {
        k: {
            q: loaded["latency"][k][q] / base["latency"][k][q]
            for q in ("p50_ms", "p99_ms")
            if base["latency"][k]["n"] and loaded["latency"][k]["n"]
        }
        for k in base["latency"]
    }


def report(base: dict[str, Any], loaded: dict[str, Any]) -> str:
    lines = []
    for ph in (base, loaded):
        r = ph["reader"]
        lines.append(
            f"load={ph['load']:<13} {ph['seconds']:.0f}s  rss {ph['rss_mb']['before']:.0f}->"
            f"{ph['rss_mb']['after']:.0f} MB  fds {ph['fds']['before']}->{ph['fds']['end']}  "
            f"cpu daemon {ph['daemon_cpu']:.2f} "
            f"load {ph['load_cpu']:.2f}  audit {ph['audit_records_per_s']:.2f} rec/s  "
            f"reader list {r['counts']} {r['errors'] or ''} "
            f"p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms"
        )
        for k, v in ph["latency"].items():
            lines.append(
                f"    {k:<9} n={v['n']:<4} p50 {v['p50_ms']:8.1f} ms  p99 {v['p99_ms']:8.1f} ms"
            )
    for k, v in ratios(base, loaded).items():
        text = "  ".join(f"{q[:3]} x{r:.2f}" for q, r in v.items())
        lines.append(f"ratio {k:<9} {text}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="soak_local_abuse.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="per phase (default 60)")
    parser.add_argument("--load", choices=LOADS, default="all", help="the abuse (default all)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root: the load runs as real users made with useradd (setpriv)")
    logs = io.StringIO()  # sandbox_host prints the daemon's log at the end
    with (
        system_accounts(more_outsiders=1) as accounts,
        redirect_stdout(logs),
        soak_host(accounts) as host,
    ):
        base = phase(host, accounts, None, args.seconds)
        loaded = phase(host, accounts, args.load, args.seconds)
        assert host.daemon is not None and host.daemon.proc.poll() is None, "the daemon died"
        refusals = host.log().count("more refused request(s)")
    if args.json:
        print(json.dumps({"base": base, "load": loaded, "ratio": ratios(base, loaded)}))
        return 0
    print(report(base, loaded))
    print(f"refusal summary lines in the daemon's log: {refusals}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
