"""The uid that owns the other end of a loopback TCP connection (edge code, Linux).

On loopback every address in ``127.0.0.0/8`` is a different "peer", so a cap per client
address does not bind a local user. The kernel knows who owns the client's socket: one exact
``SOCK_DIAG_BY_FAMILY`` request over ``NETLINK_SOCK_DIAG`` (the interface ``ss -e`` uses;
``linux/inet_diag.h``) for the client's end (source = the client's address and port,
destination = ours) answers its ``idiag_uid``. No capability is needed; one request costs a
system call round trip. Where netlink is not there (not Linux, a sandbox without
``AF_NETLINK``) `PeerUids.uid` answers None and callers fall back to the address.
"""

from __future__ import annotations

import socket
import struct
from typing import Final

NETLINK_SOCK_DIAG: Final = 4
SOCK_DIAG_BY_FAMILY: Final = 20
NLM_F_REQUEST: Final = 1
NLMSG_ERROR: Final = 2
INET_DIAG_NOCOOKIE: Final = 0xFFFFFFFF

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ = struct.Struct("=BBBxI")  # family, protocol, ext, pad, states
_SOCKID = struct.Struct("!HH16s16s")  # sport, dport (network order), src, dst
_SOCKID_TAIL = struct.Struct("=III")  # if, cookie[2]
_MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retrans
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode


def _addr(family: int, host: str) -> bytes:
    return socket.inet_pton(family, host).ljust(16, b"\0")


class PeerUids:
    """Looks up the owner of a loopback TCP client socket; one netlink socket, reused."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
            self._sock.settimeout(1.0)
        except (OSError, AttributeError):
            self._sock = None

    @property
    def available(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def uid(self, client: tuple[str, int], server: tuple[str, int]) -> int | None:
        """The uid owning the TCP socket bound to `client` and connected to `server` on this
        host, or None (not found, not local, no netlink)."""
        if self._sock is None:
            return None
        family = socket.AF_INET6 if ":" in client[0] else socket.AF_INET
        try:
            sockid = _SOCKID.pack(
                client[1], server[1], _addr(family, client[0]), _addr(family, server[0])
            ) + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
        except (OSError, ValueError, struct.error):
            return None
        body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        header = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, self._seq, 0
        )
        try:
            self._sock.send(header + body)
            while True:
                data = self._sock.recv(8192)
                length, kind, _, seq, _ = _NLMSGHDR.unpack_from(data)
                if seq == self._seq:
                    break
        except OSError:
            return None
        if kind != SOCK_DIAG_BY_FAMILY or length < _NLMSGHDR.size + 72:
            return None  # NLMSG_ERROR: no such socket (e.g. the client is not on this host)
        offset = _NLMSGHDR.size + _MSG_HEAD.size + _SOCKID.size + _SOCKID_TAIL.size
        uid: int = _MSG_TAIL.unpack_from(data, offset)[3]
        return uid
