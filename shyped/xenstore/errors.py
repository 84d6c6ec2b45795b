"""The gateway's exceptions: a small set the daemon can branch on, whatever the transport.

xenstored answers a failed request with an ERROR packet whose payload is an errno *name*
(``ENOENT``, ``EACCES``, ``EAGAIN``, ``EQUOTA``…; see ``xsd_errors`` in
``xen/include/public/io/xs_wire.h``).  The name is kept verbatim because some of them
(``EQUOTA``) are not POSIX errno names and pyxs would map them to errno 0.
"""

from __future__ import annotations

import errno as _errno


class XenstoreError(Exception):
    """A request failed; ``errno_name`` is what xenstored (or the gateway) said."""

    def __init__(self, errno_name: str, path: str | None = None, detail: str | None = None):
        self.errno_name = errno_name
        self.path = path
        self.detail = detail
        text = errno_name
        if path is not None:
            text += f" on {path}"
        if detail:
            text += f": {detail}"
        super().__init__(text)

    @property
    def errno(self) -> int | None:
        """The numeric errno for ``errno_name`` on this host, if it is a POSIX name."""
        value = getattr(_errno, self.errno_name, None)
        return value if isinstance(value, int) else None


class NoEntry(XenstoreError):
    """ENOENT: the node (or, for a write, its parent's parent) does not exist."""


class PermissionDenied(XenstoreError):
    """EACCES/EPERM: the connection may not do this to the node."""


class Again(XenstoreError):
    """EAGAIN: a transaction conflicted with another writer; it may be retried."""


class ConnectionLost(XenstoreError):
    """The connection to xenstored is gone (or was never there); nothing was decided."""

    def __init__(self, detail: str | None = None, path: str | None = None):
        super().__init__("ECONNRESET", path=path, detail=detail)


_BY_NAME: dict[str, type[XenstoreError]] = {
    "ENOENT": NoEntry,
    "EACCES": PermissionDenied,
    "EPERM": PermissionDenied,
    "EAGAIN": Again,
}


def from_errno_name(name: str, path: str | None = None) -> XenstoreError:
    """The gateway exception for an errno name from an ERROR reply."""
    return _BY_NAME.get(name, XenstoreError)(name, path=path)
