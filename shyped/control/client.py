"""A blocking control-socket client, for shypectl and shype-xl (no reactor needed).

One connection, requests answered in order. Everything that means "the daemon did not answer"
(no socket, refused, closed mid-answer, timed out) is a `DaemonUnreachable`; an answer with
``ok: false`` is the daemon's `ControlError` with its stable code.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Final, TypeVar

from shyped.control import attestops as at
from shyped.control import backend as b
from shyped.control.protocol import (
    OPS,
    ControlError,
    ErrorCode,
    encode_request,
    parse_response,
)
from shyped.core.closing import Closing
from shyped.service.config import ControlConfig

#: Environment variable naming the control socket (overrides the default path).
SOCKET_ENV: Final = "SHYPED_SOCKET"
#: Longest response line accepted (a big policy shown as text).
MAX_RESPONSE: Final = 64 * 1024 * 1024

_T = TypeVar("_T")


class DaemonUnreachable(Exception):
    """The daemon could not be asked (not running, socket missing, closed, timed out).
    `errno` is the connect error's, when there was one (EACCES: no permission on the socket)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def default_socket() -> Path:
    """$SHYPED_SOCKET, else the configuration's default (/run/shyped/control.sock)."""
    env = os.environ.get(SOCKET_ENV)
    return Path(env) if env else ControlConfig().socket


class ControlClient(Closing):
    """A connection to the daemon's control socket (a context manager)."""

    def __init__(self, path: Path | str | None = None, *, timeout: float = 10.0) -> None:
        self.path = Path(path) if path is not None else default_socket()
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._next_id = 1

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    sock.connect(os.fspath(self.path))
                    break
                except BlockingIOError:  # EAGAIN: the listen queue is full (a connect flood)
                    if time.monotonic() < deadline:
                        time.sleep(0.02)
                        continue
                    sock.close()
                    raise DaemonUnreachable(
                        f"cannot connect to shyped at {self.path}: its listen queue stayed full "
                        f"for {self.timeout:g} s"
                    ) from None
                except OSError as exc:
                    sock.close()
                    why = exc.strerror or str(exc)
                    raise DaemonUnreachable(
                        f"cannot connect to shyped at {self.path}: {why}", exc.errno
                    ) from None
            self._sock = sock
        return self._sock

    def request(self, op: str, args: Any = None, *, timeout: float | None = None) -> Any:
        """Send `op` with `args` (attrs or dict); the typed result, or raise `ControlError`."""
        spec = OPS[op]
        return self._roundtrip(op, args, spec.result, timeout)

    def raw(self, line: bytes, *, timeout: float | None = None) -> bytes:
        """Send raw bytes and return the next response line as is (tests, debugging)."""
        sock = self._connect()
        try:
            sock.sendall(line)
        except OSError as exc:
            self.close()
            raise DaemonUnreachable(f"shyped closed the connection: {exc}") from None
        return self._read_line(timeout)

    def _roundtrip(self, op: str, args: Any, result: type[_T], timeout: float | None) -> _T:
        rid = self._next_id
        self._next_id += 1
        line = self.raw(encode_request(op, args, rid), timeout=timeout)
        got, value = parse_response(line, result)
        if got != rid:
            self.close()
            raise ControlError(ErrorCode.INTERNAL, f"response id {got!r} does not match {rid}")
        return value

    def _read_line(self, timeout: float | None) -> bytes:
        sock = self._connect()
        sock.settimeout(timeout if timeout is not None else self.timeout)
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                return line
            if len(self._buf) > MAX_RESPONSE:
                self.close()
                raise ControlError(ErrorCode.INTERNAL, "response too large")
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                self.close()
                raise DaemonUnreachable("shyped did not answer in time") from None
            except OSError as exc:
                self.close()
                raise DaemonUnreachable(f"shyped closed the connection: {exc}") from None
            if not chunk:
                self.close()
                raise DaemonUnreachable("shyped closed the connection")
            self._buf += chunk

    # ---- typed helpers (one per op)

    def ping(self) -> b.Pong:
        return self._roundtrip("ping", None, b.Pong, None)

    def status(self) -> b.Status:
        return self._roundtrip("status", None, b.Status, None)

    def getenforce(self) -> b.EnforceMode:
        return self._roundtrip("getenforce", None, b.EnforceMode, None)

    def setenforce(self, mode: b.ModeName) -> b.EnforceMode:
        return self._roundtrip("setenforce", b.SetEnforceArgs(mode), b.EnforceMode, None)

    def labels(self, kind: str = "any") -> b.LabelList:
        return self._roundtrip("labels", {"type": kind}, b.LabelList, None)

    def validate_label(self, label: str, kind: b.LabelType = "vm") -> b.LabelInfo:
        return self._roundtrip(
            "validate_label", b.ValidateLabelArgs(label, kind), b.LabelInfo, None
        )

    def list_domains(self) -> b.DomainList:
        return self._roundtrip("list", None, b.DomainList, None)

    def get_domain_label(self, domain: str) -> b.DomainInfo:
        return self._roundtrip("get_domain_label", b.DomainArgs(domain), b.DomainInfo, None)

    def get_resource_label(self, resource: str) -> b.ResourceInfo:
        return self._roundtrip("get_resource_label", b.ResourceArgs(resource), b.ResourceInfo, None)

    def resources(self) -> b.ResourceList:
        return self._roundtrip("resources", None, b.ResourceList, None)

    def dry_run(self, args: b.DryRunArgs) -> b.DryRunResult:
        return self._roundtrip("dry_run", args, b.DryRunResult, None)

    def register_domain(self, uuid: str, name: str | None, label: str | None) -> b.Registration:
        return self._roundtrip(
            "register_domain", b.RegisterDomainArgs(uuid, name, label), b.Registration, None
        )

    def wait_admission(self, uuid: str, devices: int, timeout: float) -> b.Admission:
        return self._roundtrip(
            "wait_admission",
            b.WaitAdmissionArgs(uuid=uuid, devices=devices, timeout=timeout),
            b.Admission,
            timeout + self.timeout,
        )

    def relabel_domain(self, domain: str, label: str) -> b.DomainInfo:
        return self._roundtrip(
            "relabel_domain", b.RelabelDomainArgs(domain, label), b.DomainInfo, None
        )

    def set_resource_label(self, resource: str, label: str | None) -> b.ResourceLabelChange:
        return self._roundtrip(
            "set_resource_label",
            b.SetResourceLabelArgs(resource, label),
            b.ResourceLabelChange,
            None,
        )

    def policy_show(self, fmt: b.PolicyFormat = "toml") -> b.PolicyText:
        return self._roundtrip("policy_show", b.PolicyShowArgs(fmt), b.PolicyText, None)

    def policy_check(self, source: b.PolicySource) -> b.PolicyCheckResult:
        return self._roundtrip("policy_check", source, b.PolicyCheckResult, None)

    def policy_reset(self) -> b.PolicyLoadResult:
        return self._roundtrip("policy_reset", None, b.PolicyLoadResult, self.timeout * 6)

    def forget_domain(self, domain: str) -> b.Forgotten:
        return self._roundtrip("forget_domain", b.DomainArgs(domain), b.Forgotten, None)

    def policy_load(self, source: b.PolicySource | None) -> b.PolicyLoadResult:
        return self._roundtrip(
            "policy_load", b.PolicyLoadArgs(source), b.PolicyLoadResult, self.timeout * 6
        )

    def placement(self, label: str) -> b.PlacementResult:
        return self._roundtrip("placement", b.PlacementArgs(label), b.PlacementResult, None)

    def reserve(self, args: b.ReserveArgs) -> b.ReserveResult:
        return self._roundtrip("reserve", args, b.ReserveResult, None)

    def attest_quote(self, nonce: str) -> at.AttestQuote:
        return self._roundtrip("attest_quote", at.AttestQuoteArgs(nonce), at.AttestQuote, None)

    def attest_ak(self) -> at.AttestAk:
        return self._roundtrip("attest_ak", None, at.AttestAk, None)
