"""Toolstack actuators: how a veto reaches the hypervisor (pause, unpause, destroy a domain).

Two implementations of one small interface: `XlActuator` runs the `xl` command (a real dom0, or
any xl-compatible binary such as the sandbox's `python -m shyped.sandbox xl`), and
`SandboxActuator` calls the sandbox toolstack in-process (tests, demo, benchmarks). Both run
their work off the reactor thread and report failures as `ActuatorError` with the command's
own words, so a veto that could not be carried out is visible, never silent.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet import defer, threads
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure


class ActuatorError(Exception):
    """The toolstack did not carry out an action."""


class ToolstackActuator(Protocol):
    """What the enforcer needs from a toolstack."""

    def pause(self, domid: int) -> defer.Deferred[None]: ...

    def unpause(self, domid: int) -> defer.Deferred[None]: ...

    def destroy(self, domid: int) -> defer.Deferred[None]: ...


class _Collect(ProcessProtocol):
    """Collects a child's output and fires with (exit code, output)."""

    def __init__(self, done: defer.Deferred[tuple[int, bytes]]) -> None:
        self.done = done
        self.output = bytearray()

    def outReceived(self, data: bytes) -> None:
        self.output += data[: 65536 - len(self.output)]

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        code = 0
        if isinstance(reason.value, ProcessTerminated):
            code = reason.value.exitCode if reason.value.exitCode is not None else -1
        self.done.callback((code, bytes(self.output)))


@attrs.define
class XlActuator:
    """Runs `<xl> pause|unpause|destroy <domid>` as a child process."""

    reactor: Any  # IReactorProcess + IReactorTime (zope interfaces do not type-check)
    command: Sequence[str] = ("xl",)
    timeout: float = 30.0
    env: dict[str, str] | None = None

    def pause(self, domid: int) -> defer.Deferred[None]:
        return self._run("pause", domid)

    def unpause(self, domid: int) -> defer.Deferred[None]:
        return self._run("unpause", domid)

    def destroy(self, domid: int) -> defer.Deferred[None]:
        return self._run("destroy", domid)

    def _run(self, verb: str, domid: int) -> defer.Deferred[None]:
        argv = [*self.command, verb, str(int(domid))]
        done: defer.Deferred[tuple[int, bytes]] = defer.Deferred()
        proto = _Collect(done)
        env = dict(os.environ if self.env is None else self.env)
        try:
            transport = self.reactor.spawnProcess(proto, argv[0], argv, env=env)
        except OSError as exc:
            return defer.fail(ActuatorError(f"cannot run {argv[0]!r}: {exc.strerror}"))
        timer = self.reactor.callLater(self.timeout, transport.signalProcess, "KILL")

        def finished(result: tuple[int, bytes]) -> None:
            if timer.active():
                timer.cancel()
            code, output = result
            if code != 0:
                text = output.decode("utf-8", "replace").strip().splitlines()
                tail = text[-1] if text else "no output"
                raise ActuatorError(f"{' '.join(argv)} failed (exit {code}): {tail}")

        return done.addCallback(finished)


@attrs.define
class SandboxActuator:
    """Calls the sandbox toolstack's pause/unpause/destroy in a worker thread."""

    do_pause: Callable[[int], object]
    do_unpause: Callable[[int], object]
    do_destroy: Callable[[int], object]

    def pause(self, domid: int) -> defer.Deferred[None]:
        return self._call(self.do_pause, "pause", domid)

    def unpause(self, domid: int) -> defer.Deferred[None]:
        return self._call(self.do_unpause, "unpause", domid)

    def destroy(self, domid: int) -> defer.Deferred[None]:
        return self._call(self.do_destroy, "destroy", domid)

    @staticmethod
    def _call(fn: Callable[[int], object], verb: str, domid: int) -> defer.Deferred[None]:
        def run() -> None:
            try:
                fn(domid)
            except Exception as exc:
                raise ActuatorError(f"sandbox {verb} {domid} failed: {exc}") from exc

        return threads.deferToThread(run)
