"""A thin synchronous xenstore connection over pyxs, for the sandbox's simulated programs.

Why not pyxs' Client methods directly: they refuse empty values (libxl writes "" all the time,
libxl__xs_mknod) and non-ASCII bytes; we send the same wire requests through pyxs' router
without that check.  Each instance is one socket connection, i.e. one "program" in xenstored's
access log.
"""

from __future__ import annotations

import errno
from typing import Any

import pyxs
from pyxs._internal import Op, Packet, next_rq_id
from pyxs.exceptions import PyXSError
from pyxs.helpers import error as pyxs_error

from shyped.core.closing import Closing

NUL = b"\x00"


class XsError(RuntimeError):
    """A xenstore request failed; ``errno`` says why (ENOENT, EAGAIN, EACCES...)."""

    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_


class XsConn(Closing):
    """One connection to xenstored; transactions are one at a time, like libxenstore's."""

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._client: Any = pyxs.Client(unix_socket_path=socket_path)
        try:
            self._client.connect()
        except PyXSError as exc:
            raise XsError(errno.ECONNREFUSED, f"cannot connect to xenstored: {exc}") from exc
        self.tx_id = 0

    def close(self) -> None:
        self._client.close()

    # -- wire ----------------------------------------------------------------------------

    def _command(self, op: int, payload: bytes, what: str) -> bytes:
        packet = Packet(op, payload, rq_id=next_rq_id(), tx_id=self.tx_id)
        try:
            rvar = self._client.router.send(packet)
        except PyXSError as exc:  # pyxs.exceptions.ConnectionError: the socket is gone
            raise XsError(errno.ECONNRESET, f"{what}: {exc}") from exc
        # pyxs' RVar.get() waits forever if xenstored goes away; never hang a toolstack call.
        with rvar.condition:
            if not rvar.condition.wait_for(lambda: rvar.target is not None, self.timeout):
                raise XsError(errno.ETIMEDOUT, f"{what}: no answer from xenstored")
        reply = rvar.target
        if reply.op == Op.ERROR:
            failure: PyXSError = pyxs_error(reply.payload.rstrip(NUL))
            code = int(failure.args[0])
            raise XsError(code, f"{what}: {errno.errorcode.get(code, code)}")
        return bytes(reply.payload)

    @staticmethod
    def _path(path: str) -> bytes:
        return path.encode() + NUL

    # -- requests ------------------------------------------------------------------------

    def read(self, path: str) -> str | None:
        """The value, or None if the node does not exist."""
        try:
            raw = self._command(Op.READ, self._path(path), f"read {path}")
        except XsError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return raw.decode("utf-8", "replace")

    def directory(self, path: str) -> list[str] | None:
        """Child names, or None if the node does not exist."""
        try:
            raw = self._command(Op.DIRECTORY, self._path(path), f"directory {path}")
        except XsError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return [name.decode() for name in raw.split(NUL) if name]

    def write(self, path: str, value: str) -> None:
        self._command(Op.WRITE, path.encode() + NUL + value.encode(), f"write {path}")

    def mkdir(self, path: str) -> None:
        self._command(Op.MKDIR, self._path(path), f"mkdir {path}")

    def rm(self, path: str) -> bool:
        """Remove a subtree; False if it (or its parent) did not exist."""
        try:
            self._command(Op.RM, self._path(path), f"rm {path}")
        except XsError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def set_perms(self, path: str, perms: tuple[str, ...]) -> None:
        payload = self._path(path) + b"".join(p.encode() + NUL for p in perms)
        self._command(Op.SET_PERMS, payload, f"setperms {path}")

    def get_perms(self, path: str) -> tuple[str, ...] | None:
        try:
            raw = self._command(Op.GET_PERMS, self._path(path), f"getperms {path}")
        except XsError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return tuple(p.decode() for p in raw.split(NUL) if p)

    # -- transactions --------------------------------------------------------------------

    def start(self) -> None:
        if self.tx_id:
            raise XsError(errno.EALREADY, "transaction already open on this connection")
        raw = self._command(Op.TRANSACTION_START, NUL, "transaction start")
        self.tx_id = int(raw.rstrip(NUL))

    def commit(self) -> bool:
        """End the transaction; False if xenstored answered EAGAIN (the caller retries)."""
        try:
            self._command(Op.TRANSACTION_END, b"T" + NUL, "transaction commit")
        except XsError as exc:
            if exc.errno == errno.EAGAIN:
                return False
            raise
        finally:
            self.tx_id = 0
        return True

    def abort(self) -> None:
        """End the transaction without committing (errors ignored: it is gone either way)."""
        if not self.tx_id:
            return
        try:
            self._command(Op.TRANSACTION_END, b"F" + NUL, "transaction abort")
        except XsError:
            pass
        finally:
            self.tx_id = 0
