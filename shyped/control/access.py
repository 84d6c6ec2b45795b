"""Who is asking, and how many of each kind may be connected: peer credentials, access classes,
connection slots reserved per class, and the server's limits.

Every connection is put in one **slot class** from the kernel's word on its peer
(`SO_PEERCRED`/`SO_PEERGROUPS`): ``root`` (uid 0), ``admin`` (the admin group), ``read`` (the
read group) or ``other`` (anyone else: every request is refused, but gets an answer). Each class
has its own pool of slots, so no class can take another's: outsiders, however many uids they
have, can hold at most `ServerLimits.other_slots` connections in total (and
`ServerLimits.other_per_uid` each), and never a slot of the read group, the admins or root.
"""

from __future__ import annotations

import grp
import socket
import struct
from collections import Counter
from typing import Final, Literal

import attrs
from twisted.logger import Logger

from shyped.control.backend import Access, Peer
from shyped.control.protocol import MAX_ADMIN_LINE, MAX_READ_LINE
from shyped.service.config import ControlConfig

log = Logger(namespace="shyped.control")

#: Linux's SO_PEERGROUPS (not exported by every Python build).
SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)
#: CPython caps getsockopt buffers at 1024 bytes: 256 supplementary groups.
_GROUPS_BUF: Final = 1024

SlotClass = Literal["root", "admin", "read", "other"]
SLOT_CLASSES: Final[tuple[SlotClass, ...]] = ("root", "admin", "read", "other")


class ControlSetupError(Exception):
    """The control socket cannot be served (bad group name, path in use ...)."""


@attrs.frozen
class ServerLimits:
    """Per-connection, per-class and global limits; defaults suit a dom0 (120 connections at
    most, a few MiB of buffers for everyone but root and the admins)."""

    root_slots: int = 16  #: connections of root (uid 0)
    admin_slots: int = 32  #: connections of admin-group members (not root)
    read_slots: int = 64  #: connections of read-group members
    other_slots: int = 8  #: connections of everyone else (all refused; an answer says why)
    max_connections_per_uid: int = 8  #: per non-root uid in the admin and read classes
    other_per_uid: int = 2  #: per uid of the ``other`` class
    request_timeout: float = 10.0  #: seconds from a request's first byte to its newline
    idle_timeout: float = 600.0  #: seconds without a request in flight before closing
    max_read_line: int = MAX_READ_LINE
    max_admin_line: int = MAX_ADMIN_LINE
    #: Answers queued for a peer (bytes) beyond which its requests are no longer read.
    write_buffer: int = 64 * 1024
    #: Seconds a peer may leave its answers unread (reading paused) before it is cut off.
    stall_timeout: float = 30.0
    #: Refusals: the first per uid is logged and audited, the rest summarised once per interval.
    refusal_interval: float = 60.0
    #: Distinct uids tracked per interval; the rest are summarised together (uid -1).
    refusal_uids: int = 64
    #: Pending connections the kernel queues before connect() fails with EAGAIN (capped by
    #: net.core.somaxconn): room for everyone while an outsider floods connects.
    backlog: int = 1024
    #: An outsider's connection over its slots is answered ``busy`` after this many seconds
    #: (held, not read) ...
    tarpit_delay: float = 1.0
    #: ... while fewer than this many are held so; beyond, closed at once without an answer.
    tarpit_max: int = 32
    #: Expensive requests (policy parses) run at once per slot class; more wait their turn.
    heavy_per_class: int = 2
    #: ... of which the read group gets this many (it may only check, never load).
    heavy_read: int = 1

    @property
    def max_descriptors(self) -> int:
        """Connections the server may hold open at once (every class's slots and the tarpit);
        the unit's LimitNOFILE must leave room for them beside the metrics endpoint."""
        return (
            self.root_slots + self.admin_slots + self.read_slots + self.other_slots
            + self.tarpit_max
        )  # fmt: skip

    def slots(self, cls: SlotClass) -> int:
        return {
            "root": self.root_slots,
            "admin": self.admin_slots,
            "read": self.read_slots,
            "other": self.other_slots,
        }[cls]

    def heavy(self, cls: SlotClass) -> int:
        return max(1, self.heavy_read if cls == "read" else self.heavy_per_class)

    def per_uid(self, cls: SlotClass) -> int | None:
        if cls == "root":
            return None
        return self.other_per_uid if cls == "other" else self.max_connections_per_uid


def peer_credentials(sock: socket.socket) -> Peer:
    """The connecting process's uid/gid/pid and supplementary groups, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: tuple[int, ...] = ()
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _GROUPS_BUF)
        groups = tuple(struct.unpack(f"{len(data) // 4}I", data[: len(data) // 4 * 4]))
    except OSError as exc:  # ERANGE: more than 256 groups; ENOPROTOOPT: old kernel
        log.warn("control: cannot read peer groups of pid {pid}: {err}", pid=pid, err=exc)
    return Peer(uid=uid, gid=gid, pid=pid, groups=groups)


@attrs.frozen
class Authorizer:
    """root and `admin_gids` members may change things; `read_gids` members may query."""

    read_gids: frozenset[int] = frozenset()
    admin_gids: frozenset[int] = frozenset()

    @classmethod
    def from_config(cls, config: ControlConfig) -> Authorizer:
        return cls(
            read_gids=_gids(config.read_group, "control.read_group"),
            admin_gids=_gids(config.admin_group, "control.admin_group"),
        )

    def access(self, peer: Peer) -> Access | None:
        """What `peer` may do: ``admin``, ``read`` or nothing (None)."""
        gids = {peer.gid, *peer.groups}
        if peer.uid == 0 or gids & self.admin_gids:
            return "admin"
        if gids & self.read_gids:
            return "read"
        return None


def slot_class(peer: Peer, access: Access | None) -> SlotClass:
    if peer.uid == 0:
        return "root"
    return access if access is not None else "other"


def _gids(name: str | None, key: str) -> frozenset[int]:
    if name is None:
        return frozenset()
    try:
        return frozenset({grp.getgrnam(name).gr_gid})
    except KeyError:
        if name.isdecimal():
            return frozenset({int(name)})
        raise ControlSetupError(f"{key}: no group named {name!r}") from None


def allowed(have: Access | None, need: Access) -> bool:
    return have == "admin" or (have == "read" and need == "read")


@attrs.define
class Slots:
    """Connections counted per slot class and per (class, uid)."""

    limits: ServerLimits
    used: Counter[SlotClass] = attrs.field(factory=Counter)
    per_uid: Counter[tuple[SlotClass, int]] = attrs.field(factory=Counter)

    def take(self, cls: SlotClass, uid: int) -> str | None:
        """Count one connection in, or say why it is refused (nothing counted then)."""
        if self.used[cls] >= self.limits.slots(cls):
            return f"too many connections ({cls} class)"
        cap = self.limits.per_uid(cls)
        if cap is not None and self.per_uid[cls, uid] >= cap:
            return f"too many connections from uid {uid}"
        self.used[cls] += 1
        self.per_uid[cls, uid] += 1
        return None

    def give_back(self, cls: SlotClass, uid: int) -> None:
        self.used[cls] -= 1
        self.per_uid[cls, uid] -= 1
        if self.per_uid[cls, uid] <= 0:
            del self.per_uid[cls, uid]
