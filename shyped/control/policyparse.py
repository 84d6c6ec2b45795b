"""Parse a submitted policy text off the reactor: a worker process with a timeout and limits.

Why a process and not a thread or a faster parser: parsing is pure-Python CPU work (tomllib,
the policy model's validation); a thread would still hold the GIL half the time and cannot be
stopped, and Python's tomllib is quadratic on dotted keys (a 62 KB text takes ~14 s) and
raises `RecursionError` on deep nesting. A child process (`shyped.control.policyworker`) runs
with its own CPU-time and address-space limits (`ParseLimits`), is killed at `timeout`, and can
only hurt itself; the reactor waits on a pipe. A text that exceeds the limits is refused with
``policy-invalid`` and a message saying which limit, never ``internal``. How many parses run at
once is bounded by the control server (a few per access class, `ServerLimits.heavy_per_class`).

The worker's answer is a pickle (the `Policy` is built and validated there), read back with an
unpickler that only accepts the classes of `shyped.policy` and plain builtins: a worker made
to misbehave cannot make the daemon construct anything else.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import signal
import sys
from pathlib import Path
from typing import Any, Final

import attrs
from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

import shyped
from shyped.control.backend import PolicyFormat
from shyped.control.protocol import ControlError, ErrorCode
from shyped.policy.model import Policy

log = Logger(namespace="shyped.control")

_BOOT: Final = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from shyped.control.policyworker import main; sys.exit(main(sys.argv[2:]))"
)
_PACKAGE_DIR: Final = str(Path(shyped.__file__).resolve().parents[1])
_BUILTINS: Final = frozenset({"frozenset", "set", "tuple", "list", "dict", "str", "int", "float"})


@attrs.frozen
class ParseLimits:
    """What one policy parse may cost: CPU time grows with the text's size (a well-formed
    policy parses in well under a second per MiB), wall-clock time is CPU time plus slack."""

    cpu_seconds: int = 2  #: RLIMIT_CPU of the worker for a text up to 256 KiB
    cpu_per_mib: int = 4  #: more CPU seconds per MiB of text beyond that
    slack: float = 5.0  #: wall-clock seconds beyond the CPU limit before the worker is killed
    memory_bytes: int = 768 << 20  #: RLIMIT_AS of the worker
    max_answer: int = 256 << 20  #: bytes of answer read from the worker at most

    def cpu_for(self, size: int) -> int:
        return self.cpu_seconds + self.cpu_per_mib * max(0, size - (256 << 10)) // (1 << 20)

    def timeout_for(self, size: int) -> float:
        return self.cpu_for(size) + self.slack


class _SafeUnpickler(pickle.Unpickler):
    """Only the policy model's classes (never a function: pickle would call it) and a few
    plain builtins may appear in a worker's answer."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _BUILTINS:
            return super().find_class(module, name)
        if module.startswith("shyped.policy.") and "." not in name:
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a parse answer")


class _Worker(ProcessProtocol):
    def __init__(self, request: bytes, limits: ParseLimits, size: int, clock: Any) -> None:
        self.request = request
        self.limits = limits
        self.cpu = limits.cpu_for(size)
        self.timeout = limits.timeout_for(size)
        self.out = bytearray()
        self.too_much = False
        self.timed_out = False
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self._timer = clock.callLater(self.timeout, self._kill, "timeout")

    def connectionMade(self) -> None:
        t: Any = self.transport
        t.write(self.request)
        t.closeStdin()

    def outReceived(self, data: bytes) -> None:
        if len(self.out) + len(data) > self.limits.max_answer:
            self.too_much = True
            self._kill("answer")
            return
        self.out += data

    def errReceived(self, data: bytes) -> None:
        pass  # a worker's stderr is not the daemon's log (it may echo hostile text)

    def _kill(self, why: str) -> None:
        if why == "timeout":
            self.timed_out = True
        with contextlib.suppress(Exception):  # already gone
            t: Any = self.transport
            t.signalProcess("KILL")

    def processEnded(self, reason: Failure) -> None:
        if self._timer.active():
            self._timer.cancel()
        if isinstance(reason.value, ProcessDone) and not (self.timed_out or self.too_much):
            self.done.callback(bytes(self.out))
            return
        self.done.errback(self._why(reason))

    def _why(self, reason: Failure) -> ControlError:
        lim = self.limits
        if self.timed_out:
            what = f"took longer than {self.timeout:g} s to parse"
        elif self.too_much:
            what = f"parses into more than {lim.max_answer >> 20} MiB"
        elif isinstance(reason.value, ProcessTerminated) and reason.value.signal in (
            signal.SIGXCPU,
            signal.SIGKILL,
        ):
            what = f"took more than {self.cpu} s of CPU to parse"
        elif isinstance(reason.value, ProcessTerminated) and reason.value.signal is None:
            what = f"made the policy parser fail (exit status {reason.value.exitCode})"
        else:
            what = f"could not be parsed within {lim.memory_bytes >> 20} MiB of memory"
        message = f"the policy text {what} (a parser limit); nothing was loaded"
        return ControlError(ErrorCode.POLICY_INVALID, message, {"problems": [message]})


def parse_isolated(
    reactor: Any,
    text: str,
    filename: str,
    fmt: str = "auto",
    limits: ParseLimits | None = None,
) -> defer.Deferred[tuple[Policy, PolicyFormat]]:
    """`shyped.control.views.parse_policy` in a worker process (see module docstring)."""
    lim = limits or ParseLimits()
    request = json.dumps({"text": text, "filename": filename, "format": fmt}).encode()
    worker = _Worker(request, lim, len(request), reactor)
    argv = [
        sys.executable,
        "-I",
        "-c",
        _BOOT,
        _PACKAGE_DIR,
        str(worker.cpu),
        str(lim.memory_bytes),
    ]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    try:
        reactor.spawnProcess(worker, argv[0], argv, env=env, childFDs={0: "w", 1: "r", 2: "r"})
    except OSError as exc:
        return defer.fail(
            ControlError(ErrorCode.BUSY, f"cannot start a policy parser now: {exc}; try again")
        )
    return worker.done.addCallback(_decode)


def _decode(raw: bytes) -> tuple[Policy, PolicyFormat]:
    try:
        answer = _SafeUnpickler(io.BytesIO(raw)).load()
    except Exception as exc:
        log.error("policy parser answered nonsense: {err}", err=str(exc)[:200])
        answer = None
    match answer:
        case ("ok", Policy() as policy, "toml" | "acm-xml" as fmt):
            return policy, fmt
        case ("error", str(code), str(message), dict(details)) if code in _CODES:
            raise ControlError(ErrorCode(code), message, details)
    raise ControlError(
        ErrorCode.POLICY_INVALID,
        "the policy parser gave no usable answer; nothing was loaded",
        {"problems": ["the policy parser gave no usable answer"]},
    )


_CODES: Final = frozenset(str(c) for c in ErrorCode)
