"""A real Debian oxenstored running without a hypervisor, one isolated instance per directory.

Why: shyped enforces policy at the xenstore layer, so its tests, demo and benchmarks must talk
to the real daemon (quotas, permissions, watch semantics, transactions), not a fake.  The
daemon needs three things a hypervisor-less machine lacks; ``preload.c`` (an ``LD_PRELOAD``
shim compiled here at first use) provides them.  See docs/sandbox.md.

Usage::

    with SandboxXenstored(Path(tempfile.mkdtemp(dir="/tmp", prefix="xs"))) as xsd:
        subprocess.run(["xenstore-ls", "-fp"], env=xsd.env())
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import fcntl
import hashlib
import mmap
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import attrs

DEFAULT_OXENSTORED = Path("/usr/lib/xen-4.17/bin/oxenstored")
OXENSTORED_PACKAGE = "xen-utils-4.17"

# AF_UNIX sun_path is 108 bytes including the terminating NUL.
_SUN_PATH_MAX = 107

# Debian's /etc/xen/oxenstored.conf (xen-utils-4.17) values, used unless overridden.
DEBIAN_DEFAULT_CONFIG: Mapping[str, str | int | float | bool] = {
    "test-eagain": False,
    "merge-activate": True,
    "conflict-burst-limit": 5.0,
    "conflict-max-history-seconds": 0.05,
    "conflict-rate-limit-is-aggregate": True,
    "perms-activate": True,
    "perms-watch-activate": True,
    "quota-activate": True,
    "quota-maxentity": 1000,
    "quota-maxsize": 2048,
    "quota-maxwatch": 100,
    "quota-transaction": 10,
    "quota-maxrequests": 1024,
    "quota-path-max": 1024,
    "quota-maxoutstanding": 1024,
    "quota-maxwatchevents": 1024,
}

_GCC_FLAGS = ("-shared", "-fPIC", "-O2", "-Wall", "-fvisibility=hidden")

# xenstore wire protocol (xen/include/public/io/xs_wire.h): header is 4 x uint32 LE.
_XS_READ = 2
_XS_ERROR = 16
_HEADER = struct.Struct("<IIII")


class DomainState(enum.Enum):
    """What the simulated hypervisor reports for a domain (see preload.c)."""

    RUNNING = "running"
    #: Shut down (code is the SHUTDOWN_* reason); oxenstored fires @releaseDomain, keeps it.
    SHUTDOWN = "shutdown"
    #: Being destroyed: oxenstored releases it and fires @releaseDomain.
    DYING = "dying"
    #: No longer exists: same as DYING for oxenstored.
    GONE = "gone"


class SandboxXenstoredError(RuntimeError):
    """Anything that prevents a sandbox oxenstored from serving requests."""


class PrerequisiteMissing(SandboxXenstoredError):
    """oxenstored or gcc is not installed."""


class AlreadyRunning(SandboxXenstoredError):
    """Another xenstored already serves this instance's socket: we refuse to clobber it."""


class XenstoredDied(SandboxXenstoredError):
    """The daemon exited (or never became ready); the message carries its log tail."""


def cache_dir() -> Path:
    """Where compiled preload libraries are kept ($XDG_CACHE_HOME/shyped or ~/.cache/shyped)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shyped"


def short_instance_dir(prefix: str = "xs") -> Path:
    """A fresh directory under /tmp, short enough for the AF_UNIX socket path limit."""
    return Path(tempfile.mkdtemp(dir="/tmp", prefix=prefix))


def preload_source() -> bytes:
    """The C source of the LD_PRELOAD shim shipped with this package."""
    return resources.files("shyped.sandbox").joinpath("preload.c").read_bytes()


def build_preload(directory: Path | None = None) -> Path:
    """Compile the shim once per source version and return the .so path.

    The name carries a hash of the source and flags, so an edited preload.c rebuilds; the
    library is compiled under a temporary name then renamed atomically, so concurrent test
    processes never load a half-written file.
    """
    source = preload_source()
    digest = hashlib.sha256(source + " ".join(_GCC_FLAGS).encode()).hexdigest()[:16]
    directory = directory or cache_dir()
    target = directory / f"xenstored-preload-{digest}.so"
    if target.exists():
        _check_private(directory, target)
        return target
    gcc = shutil.which("gcc")
    if gcc is None:
        raise PrerequisiteMissing(
            "gcc is needed to build the sandbox xenstored preload library: "
            "install the Debian package `gcc` (scripts/install-deps.sh)"
        )
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    _check_private(directory)
    fd, tmp_name = tempfile.mkstemp(prefix=".preload-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        result = subprocess.run(
            [gcc, *_GCC_FLAGS, "-x", "c", "-", "-o", tmp_name, "-ldl"],
            input=source,
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            raise SandboxXenstoredError(
                "compiling the sandbox xenstored preload library failed:\n"
                + result.stderr.decode(errors="replace")
            )
        os.replace(tmp_name, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
    return target


def _check_private(directory: Path, library: Path | None = None) -> None:
    """Refuse a library (or its folder) that anyone but us or root could have put there.

    The library is preloaded into oxenstored, which runs with our privileges: root running
    the demo or the tests with another user's $HOME or $XDG_CACHE_HOME (``sudo -E``) must not
    load that user's code. Every folder from / down must be owned by us or root and not
    writable by others (sticky folders such as /tmp excepted above the last one).
    """
    euid = os.geteuid()
    real = directory.resolve()
    chain = [*([library] if library is not None else []), real, *real.parents]
    for p in chain:
        st = p.lstat()
        sticky_ok = p in real.parents and st.st_mode & stat.S_ISVTX
        if st.st_uid not in (0, euid):
            why = f"{p} is owned by uid {st.st_uid}"
        elif st.st_mode & 0o022 and not sticky_ok:
            why = f"{p} is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
        else:
            continue
        raise SandboxXenstoredError(
            f"refusing the sandbox preload library in {directory}: {why}; "
            "set XDG_CACHE_HOME to a folder of your own"
        )


def _format_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # always has a decimal point, as oxenstored requires
    return str(value)


def probe(socket_path: Path, timeout: float = 1.0) -> bool:
    """True if a xenstored on ``socket_path`` answers a real READ request."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(os.fsencode(socket_path))
            payload = b"/\x00"
            sock.sendall(_HEADER.pack(_XS_READ, 0x5EED, 0, len(payload)) + payload)
            header = _recv_exact(sock, _HEADER.size)
            op, req_id, _tx, length = _HEADER.unpack(header)
            _recv_exact(sock, length)
            return req_id == 0x5EED and op in (_XS_READ, _XS_ERROR)
    except OSError:
        return False


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionResetError("xenstored closed the connection")
        chunks += chunk
    return bytes(chunks)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _absolute(path: str | os.PathLike[str]) -> Path:
    return Path(path).absolute()


def _validate_instance_dir(_inst: object, _attr: object, value: Path) -> None:
    sock = os.fsencode(value.absolute() / "socket")
    if len(sock) > _SUN_PATH_MAX:
        raise ValueError(
            f"instance_dir {value} is too long for an AF_UNIX socket path "
            f"({len(sock)} > {_SUN_PATH_MAX} bytes for {value}/socket); use a short directory, "
            "e.g. tempfile.mkdtemp(dir='/tmp', prefix='xs')"
        )


@attrs.define
class SandboxXenstored:
    """One oxenstored instance whose socket, logs, pid file and config live in ``instance_dir``.

    Every client of the socket is privileged (dom0; oxenstored has no RESTRICT).  Domains can be
    introduced and released, but their rings stay silent: no guest ever issues a request.
    Not thread-safe; start and stop it from one thread.
    """

    instance_dir: Path = attrs.field(converter=_absolute, validator=_validate_instance_dir)
    binary: Path = attrs.field(default=DEFAULT_OXENSTORED, converter=Path)
    #: oxenstored.conf keys overriding :data:`DEBIAN_DEFAULT_CONFIG` (e.g. quota-maxentity) and
    #: the access-log-* settings; paths and persistence are always the instance's own.
    config: Mapping[str, str | int | float | bool] = attrs.field(factory=dict)
    log_level: str = "info"
    #: Also log READ/DIRECTORY/GET_PERMS in the access log (Debian default: off).
    access_log_read_ops: bool = False
    #: SIGKILL the daemon when the process that started it dies (PR_SET_PDEATHSIG).  Note that
    #: Linux tracks the *thread* that forked: start it from a long-lived thread.
    die_with_parent: bool = True
    #: Start like a real host (no --no-domain-init): dom0's ring connection D0 exists, so
    #: XS_INTRODUCE fires @introduceDomain and VIRQ_DOM_EXC (:meth:`set_domain_state`) makes
    #: oxenstored release dead domains and fire @releaseDomain by itself.
    domain_init: bool = True
    _proc: subprocess.Popen[bytes] | None = attrs.field(default=None, init=False, repr=False)

    # -- paths ---------------------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        """The read-write xenstore socket (what /var/run/xenstored/socket is on a real host)."""
        return self.instance_dir / "socket"

    @property
    def config_path(self) -> Path:
        return self.instance_dir / "oxenstored.conf"

    @property
    def pid_file(self) -> Path:
        return self.instance_dir / "xenstored.pid"

    @property
    def log_path(self) -> Path:
        """oxenstored's own log (xenstored-log-file)."""
        return self.instance_dir / "xenstored.log"

    @property
    def access_log_path(self) -> Path:
        """Per-request access log: one line per write/mkdir/rm/setperms/watch/introduce..."""
        return self.instance_dir / "xenstored-access.log"

    @property
    def stdout_path(self) -> Path:
        """The daemon's stdout+stderr (fatal OCaml exceptions land here)."""
        return self.instance_dir / "stdout.log"

    @property
    def lock_path(self) -> Path:
        return self.instance_dir / "lock"

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The daemon's pid; raises if it was never started."""
        if self._proc is None:
            raise SandboxXenstoredError(f"sandbox xenstored in {self.instance_dir} not started")
        return self._proc.pid

    def config_text(self) -> str:
        """The oxenstored.conf this instance runs with."""
        values: dict[str, str | int | float | bool] = dict(DEBIAN_DEFAULT_CONFIG)
        values.update(self.config)
        fixed: dict[str, str | int | float | bool] = {
            "persistent": False,
            "pid-file": str(self.pid_file),
            "xenstored-log-file": str(self.log_path),
            "xenstored-log-level": self.log_level,
            "access-log-file": str(self.access_log_path),
            # Rotation rewrites the whole store to disk (post_rotate); avoid it mid-test.
            "access-log-nb-lines": 10_000_000,
            "access-log-nb-chars": 0,
            "access-log-read-ops": self.access_log_read_ops,
            "access-log-special-ops": True,
            # dom0's ring page and its event channel port (/proc/xen/xsd_* on a real host).
            "xenstored-kva": str(self.instance_dir / "xsd_kva"),
            "xenstored-port": str(self.instance_dir / "xsd_port"),
        }
        values.update(fixed)
        values.update({k: v for k, v in self.config.items() if k.startswith("access-log")})
        lines = ["# generated by shyped.sandbox.xenstored"]
        lines += [f"{key} = {_format_value(value)}" for key, value in values.items()]
        return "\n".join(lines) + "\n"

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """An environment pointing Debian's C tools (xenstore-ls, -write...) at this instance."""
        env = dict(os.environ if base is None else base)
        env["XENSTORED_PATH"] = str(self.socket_path)
        return env

    def start(self, timeout: float = 10.0) -> None:
        """Start the daemon and return once it answers a READ; raise with its log otherwise."""
        if self.is_running():
            raise AlreadyRunning(f"this sandbox xenstored is already running (pid {self.pid})")
        if not os.access(self.binary, os.X_OK):
            raise PrerequisiteMissing(
                f"oxenstored not found at {self.binary}: install the Debian package "
                f"`{OXENSTORED_PACKAGE}` (scripts/install-deps.sh)"
            )
        preload = build_preload()
        self.instance_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = self._take_lock()
        try:
            if probe(self.socket_path):
                raise AlreadyRunning(
                    f"a xenstored already answers on {self.socket_path}; not starting another"
                )
            self._spawn(preload, lock_fd)
        finally:
            os.close(lock_fd)  # the child keeps its inherited copy, hence the lock
        try:
            self._wait_ready(timeout)
        except BaseException:
            self._kill()
            raise

    def _take_lock(self) -> int:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _tail(self.pid_file, 1).strip() or "unknown"
            raise AlreadyRunning(
                f"another sandbox xenstored (pid {holder}) is live in {self.instance_dir}; "
                "not starting another"
            ) from None
        return fd

    def _spawn(self, preload: Path, lock_fd: int) -> None:
        for stale in (self.socket_path, self.pid_file):
            stale.unlink(missing_ok=True)
        self.config_path.write_text(self.config_text())
        env = dict(os.environ)
        env["LD_PRELOAD"] = " ".join(filter(None, [str(preload), env.get("LD_PRELOAD")]))
        env["SHYPED_XENSTORED_RUNDIR"] = str(self.instance_dir)
        if self.die_with_parent:
            env["SHYPED_XENSTORED_PARENT_PID"] = str(os.getpid())
        else:
            env.pop("SHYPED_XENSTORED_PARENT_PID", None)
        argv = [str(self.binary), "--no-fork"]
        if self.domain_init:
            # dom0's ring: a zeroed page nobody drives; its remote port is never notified.
            (self.instance_dir / "xsd_kva").write_bytes(bytes(mmap.PAGESIZE))
            (self.instance_dir / "xsd_port").write_text("1")
        else:
            argv.append("--no-domain-init")
        argv += ["--pid-file", str(self.pid_file), "--config-file", str(self.config_path)]
        state_dir = self.instance_dir / "domain-state"
        shutil.rmtree(state_dir, ignore_errors=True)
        state_dir.mkdir()
        with open(self.stdout_path, "ab") as out:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.instance_dir,
                pass_fds=(lock_fd,),
                start_new_session=True,  # a terminal's Ctrl-C goes to us, we stop it cleanly
            )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            self.check()
            if probe(self.socket_path, timeout=max(0.05, deadline - time.monotonic())):
                return
            if time.monotonic() > deadline:
                raise XenstoredDied(
                    f"sandbox xenstored (pid {self.pid}) did not answer on {self.socket_path} "
                    f"within {timeout}s\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    # -- simulated hypervisor events ---------------------------------------------------------

    def set_domain_state(self, domid: int, state: DomainState, shutdown_code: int = 0) -> None:
        """Tell oxenstored, as Xen would, that a domain shut down, is dying or is gone.

        Records the state its ``xc_domain_getinfolist`` stub will report, then raises
        VIRQ_DOM_EXC: oxenstored checks every introduced domain, releases dying/gone ones
        (dropping their connection and permissions) and fires @releaseDomain, exactly as after
        ``xl destroy`` on a real host.  Shutdown fires @releaseDomain but keeps the domain.
        Needs ``domain_init`` (the VIRQ is only watched with dom0's connection set up).
        """
        if not self.domain_init:
            raise SandboxXenstoredError("set_domain_state needs domain_init=True")
        if not 0 < domid < 0x7FF0:
            raise ValueError(f"not a guest domid: {domid}")
        state_dir = self.instance_dir / "domain-state"
        tmp = state_dir / f".{domid}.tmp"
        tmp.write_text(f"{state.value} {shutdown_code}\n")
        os.replace(tmp, state_dir / str(domid))
        self.raise_dom_exc_virq()

    def raise_dom_exc_virq(self) -> None:
        """Raise VIRQ_DOM_EXC once (oxenstored then re-reads every domain's state)."""
        self.check()
        fd = os.open(self.instance_dir / "evtchn", os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, b"\0")
        finally:
            os.close(fd)

    def is_running(self) -> bool:
        """True while the daemon process is alive (a crash is noticed here)."""
        return self._proc is not None and self._proc.poll() is None

    def check(self) -> None:
        """Raise :class:`XenstoredDied` (with the log tail) unless the daemon is alive."""
        if self._proc is None:
            raise SandboxXenstoredError(f"sandbox xenstored in {self.instance_dir} not started")
        code = self._proc.poll()
        if code is None:
            return
        if code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with status {code}"
        raise XenstoredDied(f"sandbox xenstored (pid {self._proc.pid}) {how}\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        """Last lines of the daemon's stdout/stderr and log, for error messages."""
        parts = []
        for path in (self.stdout_path, self.log_path):
            tail = _tail(path, lines)
            if tail:
                parts.append(f"--- {path} ---\n{tail}")
        return "\n".join(parts) or f"(no log in {self.instance_dir})"

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, SIGKILL after ``timeout``, reap, remove the socket.  Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        else:
            proc.wait()
        self._cleanup()

    def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        self.pid_file.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def client(self) -> Any:
        """A new, unconnected ``pyxs.Client`` on this instance (use it as a context manager)."""
        import pyxs

        return pyxs.Client(unix_socket_path=str(self.socket_path))


# -- CLI -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _stop_signals() -> Iterator[list[int]]:
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shyped.sandbox.xenstored start --dir DIR``: run one until Ctrl-C/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m shyped.sandbox.xenstored",
        description="Run Debian's real oxenstored without a hypervisor (sandbox).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser(
        "start", help="start oxenstored in DIR and stay in the foreground until Ctrl-C/SIGTERM"
    )
    start.add_argument("--dir", required=True, type=Path, help="instance directory (short path)")
    start.add_argument("--binary", type=Path, default=DEFAULT_OXENSTORED, help="oxenstored path")
    start.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for it")
    start.add_argument("--read-ops", action="store_true", help="also log reads in the access log")
    args = parser.parse_args(argv)

    try:
        xsd = SandboxXenstored(args.dir, binary=args.binary, access_log_read_ops=args.read_ops)
        with _stop_signals() as received:
            xsd.start(timeout=args.timeout)
            print(f"sandbox xenstored pid {xsd.pid}, socket {xsd.socket_path}")
            print(f"access log: {xsd.access_log_path}")
            print(f"export XENSTORED_PATH={xsd.socket_path}", flush=True)
            try:
                while not received:
                    xsd.check()
                    time.sleep(0.2)
            finally:
                xsd.stop()
    except (SandboxXenstoredError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("sandbox xenstored stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
