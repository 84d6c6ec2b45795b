"""Attack: a guest that can write to Xen's console ring (an HVM guest's debug port 0xe9, a PV
guest's console_io write where the policy allows it; every line it writes gets Xen's
``(d<N>)`` prefix) floods the ring until Xen overwrites bytes the daemon has not read yet.

Xen's ``read_console_ring`` (xen/drivers/char/console.c, 4.17) then starts the read at the
oldest byte the ring still holds, in the middle of a line: without care, the tail of a guest's
line (``…(XEN) avc: denied …``) reads as one of Xen's own AVC denials, and the denials Xen
wrote in the overwritten part are lost without a word. The ring below is Xen's code in
Python; the daemon reads it through the real `XcBoundary` (only libxenctrl is replaced).
"""

from __future__ import annotations

import ctypes
from typing import Any

import pytest_twisted
from twisted.internet import reactor

from shyped.core.xenflask import AvcRecord
from shyped.policy.model import Policy
from shyped.service.flaskxc import XcBoundary
from shyped.service.flaskxen import FlaskXen

MASK = 0xFFFFFFFF
FORGED = (
    "(XEN) avc:  denied  { bind } for source=d1 target=d2 scontext=system_u:system_r:a_t "
    "tcontext=system_u:system_r:b_t tclass=event"
)
REAL = (
    "(XEN) avc:  denied  { map_read } for source=d3 target=d4 scontext=system_u:system_r:c_t "
    "tcontext=system_u:system_r:d_t tclass=grant"
)


class Conring:
    """Xen's console ring: conring_puts and read_console_ring of xen/drivers/char/console.c."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ring = bytearray(size)
        self.p = 0  # conringp
        self.c = 0  # conringc

    def puts(self, data: bytes) -> None:
        for byte in data:
            self.ring[self.p % self.size] = byte
            self.p = (self.p + 1) & MASK
        if (self.p - self.c) & MASK > self.size:
            self.c = (self.p - self.size) & MASK

    def guest_write(self, domid: int, text: str) -> None:
        """A domU's console write: Xen prefixes every line (guest_printk)."""
        for line in text.split("\n"):
            self.puts(f"(d{domid}) {line}\n".encode())

    def read(self, count: int, incremental: bool, index: int) -> tuple[bytes, int]:
        c, p = self.c, self.p
        if incremental and (c < index <= p if c <= p else c < index or index <= p):
            c = index
        out = bytearray()
        while c != p and len(out) < count:
            idx = c % self.size
            n = min((p - c) & MASK, self.size - idx, count - len(out))
            out += self.ring[idx : idx + n]
            c = (c + n) & MASK
        return bytes(out), c


class FakeLibxenctrl:
    """libxenctrl's xc_readconsolering over `Conring` (the ctypes calling convention kept);
    FLASK enforcing, every policy load accepted."""

    def __init__(self, ring: Conring) -> None:
        self.conring = ring

    def xc_flask_getenforce(self, _xch: Any) -> int:
        return 1

    def xc_flask_load(self, _xch: Any, _buf: Any, _size: int) -> int:
        return 0

    def xc_readconsolering(
        self, _xch: Any, buf: Any, nr: Any, clear: int, incremental: int, index: Any
    ) -> int:
        size, idx = nr._obj, index._obj
        data, end = self.conring.read(size.value, bool(incremental), idx.value)
        ctypes.memmove(buf, data, len(data))
        size.value, idx.value = len(data), end
        return 0


def _daemon_side(ring: Conring) -> tuple[FlaskXen, list[AvcRecord]]:
    boundary = XcBoundary()
    boundary._lib, boundary._xch = FakeLibxenctrl(ring), object()
    flask = FlaskXen(reactor, boundary, lambda _policy: b"", poll_interval=0)
    seen: list[AvcRecord] = []
    flask.on_avc = seen.extend
    return flask, seen


@pytest_twisted.ensureDeferred
async def test_a_guest_flooding_the_console_ring_cannot_forge_a_denial() -> None:
    ring = Conring(16384)  # Xen's default conring_size
    flask, seen = _daemon_side(ring)
    ring.puts(b"(XEN) Xen version 4.17 (built)\n")
    await flask.poll_now()
    # The guest writes lines whose tail is a denial in Xen's shape, enough of them to wrap the
    # ring before the next read, padded so that the oldest byte the ring keeps (the last
    # byte written - 16384) is the first of the forged text: the guest tries padding after
    # padding on every poll; here it is lucky at once.
    prefix = len("(d7) ")
    n = next(n for n in range(1, 500) if (16384 + prefix + n) % (prefix + n + len(FORGED) + 1) == 0)
    line = "A" * n + FORGED
    ring.guest_write(7, "\n".join([line] * (16384 // len(line) + 2)))
    first_kept = ring.ring[ring.c % ring.size : ring.c % ring.size + 5]
    await flask.poll_now()
    assert not [r for r in seen if r.scontext == "system_u:system_r:a_t"], (
        f"a guest's line read as Xen's denial (ring cut at {first_kept!r})"
    )


@pytest_twisted.ensureDeferred
async def test_denials_the_ring_overwrote_are_reported_lost() -> None:
    ring = Conring(16384)
    flask, seen = _daemon_side(ring)
    await flask.poll_now()
    ring.puts((REAL + "\n").encode())  # Xen's real denial ...
    ring.guest_write(9, "\n".join(["x" * 150] * 200))  # ... pushed out by a flood
    await flask.poll_now()
    assert seen == []
    assert flask.status()["console_overruns"] == 1
    ring.puts((REAL + "\n").encode())  # the next read is whole again
    await flask.poll_now()
    assert [r.tclass for r in seen] == ["grant"]
    assert flask.status()["console_overruns"] == 1


@pytest_twisted.ensureDeferred
async def test_a_start_skips_all_the_ring_holds_however_large() -> None:
    """A host booted with a large ring (``conring_size=``) holds more than one read takes
    (256 KiB): the start must still begin at its end, or Xen's denials from before the start
    (another daemon's, long dealt with) come into this daemon's trail as new ones."""
    ring = Conring(1 << 20)
    ring.puts(("(XEN) boot noise " + "x" * 100 + "\n").encode() * 3000)  # ~350 KiB
    ring.puts((REAL + "\n").encode())  # an old denial, past the first 256 KiB
    flask, seen = _daemon_side(ring)
    flask.poll_interval = 0
    await flask.start(Policy.__new__(Policy))
    await flask.poll_now()
    assert seen == []
    ring.puts((REAL + "\n").encode())  # a new one is read
    await flask.poll_now()
    assert len(seen) == 1
