"""A minimal blocking xenstore client on a plain socket: the baseline and the hostile writer.

Why it exists: benchmarks compare the gateway against the cheapest possible round trip (one
``sendall``, one ``recv`` on the caller's thread, no router thread), and tests need a writer
that floods a subtree as fast as a misbehaving guest would, from another process so that it
does not share the daemon's interpreter.  Not for the daemon itself, which uses the gateway.

``python -m shyped.xenstore.rawclient flood --socket S --prefix /local/domain/5/data
--rate 10000 --duration 2 --distinct 50`` writes ``prefix/k<i % distinct>`` at ``rate``/s.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections import deque
from collections.abc import Sequence

from shyped.core.closing import Closing
from shyped.xenstore import wire
from shyped.xenstore.errors import from_errno_name
from shyped.xenstore.wire import Op


class RawClient(Closing):
    """One Unix-socket connection; requests are answered in order (no pipelining here)."""

    def __init__(self, socket_path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(socket_path)
        self._req_id = 0
        #: Watch events received while waiting for a reply, oldest first.
        self.events: deque[tuple[bytes, bytes]] = deque()

    def close(self) -> None:
        self.sock.close()

    def _recv_exact(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionResetError("xenstored closed the connection")
            data += chunk
        return bytes(data)

    def _recv_message(self) -> tuple[wire.Header, bytes]:
        header = wire.unpack_header(self._recv_exact(wire.HEADER.size))
        return header, self._recv_exact(header.length) if header.length else b""

    def request(self, op: int, payload: bytes, tx_id: int = 0) -> bytes:
        """Send one request and return its reply payload; raise the gateway's errors."""
        self._req_id = (self._req_id + 1) & 0xFFFFFFFF
        self.sock.sendall(wire.pack(op, payload, self._req_id, tx_id))
        while True:
            header, body = self._recv_message()
            if header.op == Op.WATCH_EVENT:
                self.events.append(wire.watch_event(body))
                continue
            if header.req_id != self._req_id:
                raise wire.WireError(f"reply to {header.req_id}, expected {self._req_id}")
            if header.op == Op.ERROR:
                raise from_errno_name(wire.error_name(body))
            return body

    def read(self, path: bytes) -> bytes:
        return self.request(Op.READ, wire.path_payload(path))

    def write(self, path: bytes, value: bytes) -> None:
        wire.ack(self.request(Op.WRITE, wire.write_payload(path, value)))

    def rm(self, path: bytes) -> None:
        wire.ack(self.request(Op.RM, wire.path_payload(path)))

    def watch(self, path: bytes, token: bytes) -> None:
        wire.ack(self.request(Op.WATCH, wire.watch_payload(path, token)))

    def wait_event(self) -> tuple[bytes, bytes]:
        """The next watch event (path, token), blocking."""
        if self.events:
            return self.events.popleft()
        while True:
            header, body = self._recv_message()
            if header.op == Op.WATCH_EVENT:
                return wire.watch_event(body)
            raise wire.WireError(f"unexpected message type {header.op} while waiting")


def flood(
    socket_path: str, prefix: bytes, rate: float, duration: float, distinct: int
) -> tuple[int, float]:
    """Write ``prefix/k<n>`` at ``rate`` writes/s (0: as fast as possible) for ``duration`` s.

    Writes due together are pipelined in one send, as a guest filling its ring would do, so the
    rate does not depend on this process's round-trip time.  Returns (writes, seconds).
    """
    with RawClient(socket_path) as client:
        start = time.monotonic()
        count = 0
        while True:
            now = time.monotonic()
            if now - start >= duration:
                break
            due = int((now - start) * rate) + 1 if rate > 0 else count + 64
            burst = min(due - count, 256)
            if burst <= 0:
                time.sleep(min(0.001, (count + 1) / rate - (now - start)))
                continue
            frames = []
            for n in range(count, count + burst):
                key = prefix + b"/k%d" % (n % distinct)
                frames.append(wire.pack(Op.WRITE, wire.write_payload(key, b"%d" % n), n + 1))
            client.sock.sendall(b"".join(frames))
            for _ in range(burst):
                header, body = client._recv_message()
                if header.op == Op.ERROR:
                    raise from_errno_name(wire.error_name(body))
            count += burst
        return count, time.monotonic() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shyped.xenstore.rawclient",
        description="Raw-socket xenstore client: flood a subtree like a hostile guest.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fl = sub.add_parser("flood", help="write prefix/k<i %% distinct> at a given rate")
    fl.add_argument("--socket", required=True, help="xenstored Unix socket path")
    fl.add_argument("--prefix", required=True, help="absolute xenstore path to write under")
    fl.add_argument("--rate", type=float, default=10_000.0, help="writes per second (0: max)")
    fl.add_argument("--duration", type=float, default=1.0, help="seconds")
    fl.add_argument("--distinct", type=int, default=1, help="number of distinct nodes")
    args = parser.parse_args(argv)
    count, elapsed = flood(
        args.socket, args.prefix.encode("ascii"), args.rate, args.duration, max(1, args.distinct)
    )
    print(f"{count} writes in {elapsed:.3f}s ({count / elapsed:.0f}/s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
