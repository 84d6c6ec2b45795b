"""Denials mirrored to the Linux audit subsystem as ``USER_AVC`` records (edge code).

An sHype denial is sent as the kernel's userspace AVC message type (``AUDIT_USER_AVC`` = 1107,
include/uapi/linux/audit.h) on a ``NETLINK_AUDIT`` socket, as SELinux-aware userspace object
managers (dbus, systemd) send theirs, so ``ausearch -m USER_AVC`` shows them beside SELinux's.
The kernel checks ``CAP_AUDIT_WRITE`` (and refuses callers outside the initial user namespace),
stamps pid/uid/auid/ses/subj and wraps the text in ``msg='…'``.

Where that is not possible (no audit in the kernel, no capability, a container) the first
failure is logged once and the mirror turns itself off: it is never fatal, and the daemon's
log and audit trail hold every denial anyway. At most `burst` messages are sent per
`interval` seconds; the rest are counted and reported in one log line per interval.

`format_user_avc` is pure (tested on its own); `UserAvcMirror` is the socket and the
decision listener the daemon is given.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from twisted.logger import Logger

from shyped.core.audit import Party
from shyped.core.outcome import Outcome

AUDIT_USER_AVC: Final = 1107
NETLINK_AUDIT: Final = 9
NLMSG_ERROR: Final = 2
NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4
#: The kernel cuts a user message at AUDIT_MESSAGE_TEXT_MAX (8560); stay well below.
MAX_TEXT: Final = 4096
_HEADER: Final = struct.Struct("=IHHII")  # struct nlmsghdr

_log = Logger(namespace="shyped.linuxaudit")


def _value(value: object) -> str:
    """A field value: a plain token as is, anything else JSON-quoted. Never a ``'``: the kernel
    wraps the text in ``msg='…'``."""
    text = str(value)
    if text and all(c.isalnum() or c in "-_.:/@+,[]" for c in text) and text.isascii():
        return text
    return json.dumps(text, ensure_ascii=True).replace("'", "\\u0027")


def _context(policy: str, label: str | None) -> str:
    if not label:
        return "unlabelled"
    return label if label.startswith("ACM:") else f"ACM:{policy}:{label}"


def format_user_avc(outcome: Outcome, *, comm: str = "shyped") -> str:
    """The ``USER_AVC`` text of a denial, in libselinux's AVC form::

    avc:  denied  { vchan } for  comm=shyped scontext=ACM:hosting:bank-a-web
    tcontext=ACM:hosting:shop tclass=shyped sname=bank-a-web-1 sdomid=3 tname=shop-1
    tdomid=7 rule=ste reason="..." permissive=0
    """
    d = outcome.decision
    target: Party | None = outcome.resource if outcome.resource is not None else outcome.peer
    parts = [
        f"avc:  denied  {{ {_value(outcome.kind)} }} for ",
        f"comm={_value(comm)}",
        f"scontext={_value(_context(outcome.policy, outcome.subject.label))}",
        # no other party (a domain's admission): the domain itself, as SELinux's "self"
        "tcontext=" + _value(_context(outcome.policy, (target or outcome.subject).label)),
        "tclass=shyped",
    ]
    for prefix, p in (("s", outcome.subject), ("t", outcome.peer)):
        if p is None:
            continue
        if p.name is not None:
            parts.append(f"{prefix}name={_value(p.name)}")
        if p.domid is not None:
            parts.append(f"{prefix}domid={p.domid}")
    if outcome.resource is not None and outcome.resource.resource is not None:
        parts.append(f"resource={_value(outcome.resource.resource)}")
    parts.append(f"hook={_value(d.hook)}")
    parts.append(f"rule={_value(d.rule)}")
    parts.append(f"reason={_value(d.reason)}")
    parts.append(f"permissive={0 if outcome.mode.value == 'enforcing' else 1}")
    text = parts[0] + " ".join(parts[1:])
    if len(text) > MAX_TEXT:
        text = text[: MAX_TEXT - 3] + "..."
    return text


def netlink_message(text: str, seq: int) -> bytes:
    """An ``AUDIT_USER_AVC`` request asking for an acknowledgement."""
    payload = text.encode("utf-8", "replace") + b"\0"
    payload += b"\0" * (-len(payload) % 4)
    header = _HEADER.pack(
        _HEADER.size + len(payload), AUDIT_USER_AVC, NLM_F_REQUEST | NLM_F_ACK, seq, 0
    )
    return header + payload


def ack_error(data: bytes, seq: int) -> int | None:
    """The errno of the kernel's acknowledgement of `seq` in `data` (0: accepted), or None
    if `data` holds none."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _flags, their_seq, _pid = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            return None
        if kind == NLMSG_ERROR and their_seq == seq and length >= _HEADER.size + 4:
            err: int = struct.unpack_from("=i", data, offset + _HEADER.size)[0]
            return -err
        offset += (length + 3) & ~3
    return None


class AuditSocket(Protocol):
    def sendto(self, data: bytes, address: Any, /) -> int: ...
    def recv(self, size: int, flags: int = 0, /) -> bytes: ...
    def close(self) -> None: ...


def open_audit_socket() -> AuditSocket:
    """A non-blocking ``NETLINK_AUDIT`` socket (OSError where the kernel has none)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_AUDIT)
    sock.setblocking(False)
    return sock


class UserAvcMirror:
    """Sends each denial it is given as ``USER_AVC``; off for good after the first failure."""

    def __init__(
        self,
        *,
        opener: Callable[[], AuditSocket] = open_audit_socket,
        burst: int = 50,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        comm: str = "shyped",
    ) -> None:
        self._opener = opener
        self._sock: AuditSocket | None = None
        self.enabled = True
        self.sent = 0
        self.suppressed = 0
        self.error: str | None = None
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._window_start = clock()
        self._in_window = 0
        self._seq = 0
        self._comm = comm

    def _disable(self, why: str) -> None:
        self.enabled = False
        self.error = why
        _log.warn(
            "denials are not mirrored to the Linux audit log (USER_AVC): {why}; the daemon's "
            "log and audit trail keep them",
            why=why,
        )
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _allowed(self) -> bool:
        now = self._clock()
        if now - self._window_start >= self._interval:
            if self.suppressed:
                _log.warn(
                    "USER_AVC: {n} denial(s) not mirrored in {s:g} s (more than {burst})",
                    n=self.suppressed,
                    s=self._interval,
                    burst=self._burst,
                )
            self._window_start, self._in_window, self.suppressed = now, 0, 0
        if self._in_window >= self._burst:
            self.suppressed += 1
            return False
        self._in_window += 1
        return True

    def send(self, text: str) -> bool:
        """Send one message; False when the mirror is off or the message was not sent."""
        if not self.enabled or not self._allowed():
            return False
        try:
            if self._sock is None:
                self._sock = self._opener()
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            self._sock.sendto(netlink_message(text, self._seq), (0, 0))
            try:
                err = ack_error(self._sock.recv(8192), self._seq)
            except BlockingIOError:
                err = None  # no acknowledgement queued: taken as sent
        except OSError as exc:
            self._disable(f"{os.strerror(exc.errno) if exc.errno else exc}")
            return False
        if err:
            hint = " (needs CAP_AUDIT_WRITE)" if err in (errno.EPERM, errno.EACCES) else ""
            self._disable(f"the kernel refused it: {os.strerror(err)}{hint}")
            return False
        self.sent += 1
        return True

    def __call__(self, outcome: Outcome) -> None:
        """A decision listener: mirror denials, ignore permits."""
        if not outcome.allowed and self.enabled:
            self.send(format_user_avc(outcome, comm=self._comm))
