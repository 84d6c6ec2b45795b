"""Boots the e2e images under QEMU and runs one scenario in the real dom0.

A scenario is a shell script (tests/e2e/scenarios/<name>.sh) that dom0's /init runs once Xen,
oxenstored, xen-init-dom0, xenconsoled and the bridge are up.  It is appended to dom0's
initramfs as a second cpio archive (/job/run, with /job/files/* and /job/env), so no disk or
network is needed to hand it over.  It talks back over the console only (see image/e2e-lib.sh):
progress lines, result files framed with size and sha256, and its exit code.  The runner
streams QEMU's serial port to a file, follows it, and gives up with the log's tail when a phase
takes too long (boot, dom0 services, the scenario, power-off) or the hypervisor or a kernel
panics.  Run `python tests/e2e/runner.py boot` to try a scenario by hand.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import attrs
from builder import Images, ensure_images

HERE = Path(__file__).resolve().parent
SCENARIOS = HERE / "scenarios"
#: Functions the scenarios share, sourced before each (sent with the job, not in the image).
SCENARIO_LIB = HERE / "scenario-lib.sh"
REPO = HERE.parents[1]

#: Xen's command line (as in shared/xen-4.17-reference: com1 console, 1 GB dom0 on one vCPU,
#: no reboot on panic).  sync_console: Xen otherwise drops console characters when its
#: transmit buffer is full, and the results travel over that console.
XEN_CMDLINE = (
    "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=1 "
    "loglvl=all guest_loglvl=all noreboot sync_console"
)
#: dom0's command line; QEMU splits -initrd on commas, so it must contain none.
DOM0_CMDLINE = "console=hvc0 earlyprintk=xen rdinit=/init"
#: -cpu: qemu64 with SVM and nested paging, so Xen has HAP (HVM/PVH guests possible).  Not
#: `max`: even as `max,-smap,-rdtscp` (plain max makes dom0 take an SMAP fault) and with pcid,
#: invpcid, la57, pku, fsgsbase, smep, umip or svm removed, random dom0 processes (xl, busybox,
#: xenstore-read) segfaulted while a guest booted -- about one crash per guest boot with a
#: process polling xenstore meanwhile, against none in 8 such boots on qemu64 (QEMU 7.2 TCG).
#: $SHYPED_E2E_QEMU_CPU overrides it (for experiments).
QEMU_CPU = "qemu64,+svm,+npt"
HOST_SHARE_TAG = "hostroot"

#: Seconds beyond the scenario timeout for dom0 to report a killed scenario's diagnostics.
DIAG_MARGIN = 90.0
#: Serial lines that mean the machine will not come back.
PANIC = re.compile(
    r"Panic on CPU|Kernel panic - not syncing|Manual reset required|Reboot in five seconds"
)
_MARK = re.compile(r"@@E2E (?P<kind>[A-Z]+)(?: (?P<rest>.*))?$")


@attrs.frozen
class Hypervisor:
    """The Xen QEMU boots when not the images' own (Debian's): its binary, words appended to
    XEN_CMDLINE (e.g. ``flask=enforcing``), and multiboot modules after dom0's kernel and
    initramfs (e.g. a binary FLASK policy, which Xen finds by its magic)."""

    xen: Path
    cmdline: str = ""
    modules: tuple[Path, ...] = ()
    #: a short name for logs and the job's $E2E_XEN (``debian``, ``flask``)
    name: str = "custom"


class E2EError(Exception):
    """The machine did not boot, a phase timed out, or the results were damaged; the message
    ends with the tail of the serial log."""


@attrs.frozen
class Timeouts:
    """Seconds allowed for each phase (TCG on a busy 2-core machine is slow; these are generous
    upper bounds, not expectations)."""

    boot: float = 240.0  # QEMU start -> dom0's /init runs
    ready: float = 120.0  # /init -> xenstored, xenconsoled, bridge up
    scenario: float = 600.0  # ready -> scenario exit
    poweroff: float = 60.0  # scenario exit -> QEMU gone


@attrs.frozen
class RunResult:
    scenario: str
    exit_code: int
    files: Mapping[str, bytes]
    steps: tuple[tuple[float, str], ...]
    #: wall-clock seconds since QEMU started, per milestone (init, ready, exit, end)
    timings: Mapping[str, float]
    serial_log: Path
    workdir: Path

    def text(self, name: str) -> str:
        if name not in self.files:
            raise KeyError(
                f"scenario {self.scenario} sent no result {name!r}: {sorted(self.files)}"
            )
        return self.files[name].decode()


def host_paths() -> list[str]:
    """What a Python scenario needs at the same path in dom0 (besides the host's /usr): the
    interpreter's installation, the venv, the repository.  Nested paths are dropped."""
    candidates = {
        os.path.realpath(sys.base_prefix),
        os.path.realpath(sys.prefix),
        str(REPO),
    }
    kept: list[str] = []
    for path in sorted(candidates, key=len):
        if path == "/usr" or path.startswith("/usr/"):
            continue
        if not any(path == k or path.startswith(k + "/") for k in kept):
            kept.append(path)
    return kept


def _cpio_job(scenario: Path, files: Mapping[str, bytes], env: Mapping[str, str]) -> bytes:
    """The /job archive: run (libs + scenario), files/, env.  Built with the cpio tool from a
    scratch directory so it is a plain newc archive like the base initramfs."""
    with tempfile.TemporaryDirectory(prefix="shyped-e2e-job-") as tmp:
        root = Path(tmp)
        job = root / "job"
        (job / "files").mkdir(parents=True)
        run = (
            "#!/bin/sh\n"
            ". /usr/lib/shyped-e2e/lib.sh\n"
            ". /job/env\n"
            ". /job/scenario-lib.sh\n"
            f"# scenario {scenario.name}\n"
            "cd /job/files\n"
            ". /job/scenario.sh\n"
        )
        (job / "run").write_text(run)
        shutil.copyfile(SCENARIO_LIB, job / "scenario-lib.sh")
        shutil.copyfile(scenario, job / "scenario.sh")
        lines = [f"export {k}='{v}'\n" for k, v in env.items()]
        for k, v in env.items():
            if "'" in v or "\n" in v:
                raise ValueError(f"job env {k} holds a quote or newline: {v!r}")
        (job / "env").write_text("".join(lines))
        for name, data in files.items():
            if "/" in name or name.startswith("."):
                raise ValueError(f"job file names are plain names: {name!r}")
            (job / "files" / name).write_bytes(data)
        names = sorted(
            os.path.relpath(os.path.join(d, n), root)
            for d, dirs, fs in os.walk(root)
            for n in (*dirs, *fs)
        )
        proc = subprocess.run(
            ["cpio", "--null", "--create", "--format=newc", "--owner=0:0", "--quiet"],
            cwd=root,
            input=("\0".join(names) + "\0").encode(),
            capture_output=True,
            check=True,
        )
        out = io.BytesIO()
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as gz:
            gz.write(proc.stdout)
        return out.getvalue()


def qemu_command(
    images: Images,
    initrd: Path,
    serial: Path,
    *,
    host_share: bool,
    hypervisor: Hypervisor | None = None,
) -> list[str]:
    xen = hypervisor.xen if hypervisor else images.xen
    modules = hypervisor.modules if hypervisor else ()
    for path in (xen, images.kernel, initrd, *modules):
        if "," in str(path) or " " in str(path):
            raise E2EError(f"QEMU's multiboot -initrd cannot take a path with ',' or ' ': {path}")
    xen_cmdline = os.environ.get("SHYPED_E2E_XEN_CMDLINE") or XEN_CMDLINE
    if hypervisor and hypervisor.cmdline:
        xen_cmdline = f"{xen_cmdline} {hypervisor.cmdline}"
    cmd = [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-cpu", os.environ.get("SHYPED_E2E_QEMU_CPU") or QEMU_CPU,
        "-smp", "1",
        "-m", "2048",
        "-nodefaults",
        "-display", "none",
        "-vga", "none",
        "-monitor", "none",
        "-no-reboot",
        "-serial", f"file:{serial}",
        "-kernel", str(xen),
        "-append", xen_cmdline,
        "-initrd", ",".join([f"{images.kernel} {DOM0_CMDLINE}", str(initrd), *map(str, modules)]),
    ]  # fmt: skip
    if host_share:
        cmd += [
            "-virtfs",
            f"local,path=/,mount_tag={HOST_SHARE_TAG},security_model=none,readonly=on,"
            "multidevs=remap",
        ]
    return cmd


@attrs.define
class SerialFollower:
    """Reads the serial log as it grows and decodes the @@E2E protocol."""

    path: Path
    started: float
    offset: int = 0
    partial: bytes = b""
    lines: list[str] = attrs.field(factory=list)
    steps: list[tuple[float, str]] = attrs.field(factory=list)
    timings: dict[str, float] = attrs.field(factory=dict)
    files: dict[str, bytes] = attrs.field(factory=dict)
    exit_code: int | None = None
    failure: str | None = None
    panic: str | None = None
    _open: dict[str, tuple[int, str, dict[int, str]]] = attrs.field(factory=dict)

    def poll(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        self.offset += len(chunk)
        data = self.partial + chunk
        *complete, self.partial = data.split(b"\n")
        for raw in complete:
            self._line(raw.decode("utf-8", errors="replace").replace("\r", ""))

    def _line(self, line: str) -> None:
        self.lines.append(line)
        if PANIC.search(line) and self.panic is None:
            self.panic = line.strip()
        at = line.find("@@E2E ")
        if at < 0:
            return
        m = _MARK.match(line[at:])
        if not m:
            return
        kind, rest = m["kind"], m["rest"] or ""
        now = round(time.monotonic() - self.started, 1)
        if kind == "INIT":
            self.timings["init"] = now
        elif kind == "READY":
            self.timings["ready"] = now
        elif kind == "STEP":
            self.steps.append((now, rest))
        elif kind == "FAIL":
            self.failure = rest
        elif kind == "EXIT":
            self.timings["exit"] = now
            self.exit_code = int(rest.split()[0]) if rest.split() else -1
        elif kind == "FILE":
            name, size, digest = rest.split()
            self._open[name] = (int(size), digest, {})
        elif kind == "D":
            parts = rest.split(" ")
            if len(parts) == 3 and parts[0] in self._open:
                self._open[parts[0]][2][int(parts[1])] = parts[2]
        elif kind == "EOF":
            self._close(rest.strip())

    def _close(self, name: str) -> None:
        if name not in self._open:
            raise E2EError(f"result {name}: EOF without FILE (damaged serial line?)")
        size, digest, chunks = self._open.pop(name)
        count = max(chunks, default=0)
        missing = [i for i in range(1, count + 1) if i not in chunks]
        data = (
            base64.b64decode("".join(chunks[i] for i in range(1, count + 1)))
            if not missing
            else b""
        )
        if missing or len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            raise E2EError(
                f"result {name} arrived damaged over the serial console (lines missing: "
                f"{missing[:5]}, {len(data)}/{size} bytes)"
            )
        self.files[name] = data

    def tail(self, n: int = 60) -> str:
        last = [*self.lines, self.partial.decode("utf-8", errors="replace")][-n:]
        return "\n".join(last)


def run_scenario(
    images: Images,
    scenario: str | Path,
    *,
    workdir: Path,
    files: Mapping[str, bytes] | None = None,
    env: Mapping[str, str] | None = None,
    timeouts: Timeouts | None = None,
    host_share: bool = True,
    hypervisor: Hypervisor | None = None,
) -> RunResult:
    """Boot, run `scenario` (a name under scenarios/ or a path) in dom0, collect its results.
    `hypervisor`: boot that Xen (with its command line and modules) instead of the images'.

    Raises E2EError (with the serial log's tail) when a phase times out, the machine panics,
    or a result arrives damaged; a scenario that fails still returns, with its exit code."""
    timeouts = timeouts or Timeouts()
    script = Path(scenario) if isinstance(scenario, Path) else SCENARIOS / f"{scenario}.sh"
    if not script.is_file():
        raise E2EError(f"no scenario script {script}")
    name = script.stem
    workdir.mkdir(parents=True, exist_ok=True)
    serial = workdir / "serial.log"
    serial.unlink(missing_ok=True)
    job_env = {
        "E2E_SCENARIO": name,
        "E2E_SCENARIO_TIMEOUT": str(int(timeouts.scenario)),
        "E2E_REPO": str(REPO),
        "E2E_VENV": os.path.realpath(sys.prefix),
        "E2E_PYTHON": str(Path(sys.prefix) / "bin" / "python"),
        "E2E_HOST_PATHS": " ".join(host_paths()),
        "E2E_HOST_SHARE": HOST_SHARE_TAG if host_share else "",
        "E2E_XEN": hypervisor.name if hypervisor else "debian",
        **(env or {}),
    }
    initrd = workdir / "dom0-job.cpio.gz"
    with initrd.open("wb") as out:
        with images.dom0_initrd.open("rb") as base:
            shutil.copyfileobj(base, out)
        out.write(_cpio_job(script, files or {}, job_env))

    cmd = qemu_command(images, initrd, serial, host_share=host_share, hypervisor=hypervisor)
    (workdir / "qemu-cmdline.txt").write_text(" ".join(cmd) + "\n")
    qemu_log = (workdir / "qemu.log").open("wb")
    started = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=qemu_log)
    except OSError as exc:
        qemu_log.close()
        raise E2EError(f"cannot start QEMU ({exc}): run scripts/install-deps.sh") from exc
    follower = SerialFollower(serial, started)

    def fail(why: str) -> E2EError:
        follower.poll()
        steps = "".join(f"\n  {t:7.1f}s {s}" for t, s in follower.steps[-10:])
        return E2EError(
            f"scenario {name}: {why} ({time.monotonic() - started:.0f}s after QEMU start)"
            f"{steps}\n--- serial log tail ({serial}) ---\n{follower.tail()}"
        )

    try:
        phases = (
            ("init", timeouts.boot, "dom0's /init never ran (hypervisor or kernel boot hung)"),
            ("ready", timeouts.ready, "dom0's Xen services did not come up"),
            # dom0 kills the scenario itself after timeouts.scenario and then sends its diag/
            # files; the margin lets that arrive before the runner gives up.
            ("exit", timeouts.scenario + DIAG_MARGIN, "the scenario did not finish"),
        )
        deadline = started
        for key, budget, why in phases:
            deadline = max(deadline, time.monotonic()) + budget
            while key not in follower.timings:
                follower.poll()
                if follower.failure:
                    raise fail(f"dom0 init failed: {follower.failure}")
                if follower.panic:
                    raise fail(f"panic: {follower.panic}")
                if key in follower.timings:
                    break
                if proc.poll() is not None:
                    raise fail(f"QEMU exited ({proc.returncode}) before '{key}': {why}")
                if time.monotonic() > deadline:
                    raise fail(f"timeout after {budget:.0f}s: {why}")
                time.sleep(0.2)
        try:
            proc.wait(timeout=timeouts.poweroff)
        except subprocess.TimeoutExpired:
            raise fail("dom0 did not power the machine off") from None
        follower.poll()
        follower.timings["end"] = round(time.monotonic() - started, 1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        qemu_log.close()
    assert follower.exit_code is not None
    for fname, data in follower.files.items():
        dest = workdir / "results" / fname
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    return RunResult(
        scenario=name,
        exit_code=follower.exit_code,
        files=dict(follower.files),
        steps=tuple(follower.steps),
        timings=dict(follower.timings),
        serial_log=serial,
        workdir=workdir,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one e2e scenario in a real dom0 under QEMU.")
    parser.add_argument("scenario", help="name under tests/e2e/scenarios/ or a path to a .sh")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temp dir")
    parser.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="PATH",
        help="put PATH into /job/files in dom0 (repeatable)",
    )
    parser.add_argument(
        "--xen",
        choices=("debian", "flask"),
        default="debian",
        help="flask: Xen 4.17.7 built with FLASK (tests/e2e/flaskxen.py)",
    )
    parser.add_argument(
        "--flask-policy", type=Path, help="sHype policy file, compiled as Xen's boot policy"
    )
    parser.add_argument(
        "--flask-mode", choices=("enforcing", "permissive", "disabled"), default="enforcing"
    )
    args = parser.parse_args(argv)
    scenario: str | Path = args.scenario
    if args.scenario.endswith(".sh"):
        scenario = Path(args.scenario).resolve()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="shyped-e2e-run-"))
    log: list[str] = []
    images = ensure_images(log=log)
    hypervisor = None
    if args.xen == "flask":
        # Imported here: flaskboot builds on this module.
        from flaskboot import compile_flask_policy, flask_hypervisor
        from flaskxen import ensure_flask_xen

        binary = None
        if args.flask_policy:
            binary = compile_flask_policy(args.flask_policy, workdir / "xenpolicy")
        hypervisor = flask_hypervisor(
            ensure_flask_xen(log=log), mode=args.flask_mode, policy_binary=binary
        )
    print("\n".join(log))
    files = {Path(p).name: Path(p).read_bytes() for p in args.file}
    try:
        result = run_scenario(images, scenario, workdir=workdir, files=files, hypervisor=hypervisor)
    except E2EError as exc:
        print(exc, file=sys.stderr)
        return 2
    for t, step in result.steps:
        print(f"{t:7.1f}s  {step}")
    print(f"timings: {dict(result.timings)}")
    print(f"results in {workdir / 'results'}: {sorted(result.files)}")
    print(f"exit code {result.exit_code}")
    return 0 if result.exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
