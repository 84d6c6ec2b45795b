"""Who asked for the request being dispatched: set by the control server around each call of a
backend method (`shyped.control.connections`), read by the ops that treat callers differently (the
attestation quote's per-uid rate limit, `shyped.control.attestserve`).

A context variable rather than an argument of every backend method: one op needs it, and the
`ControlBackend` protocol stays as it is. It is read synchronously at the op's entry (before
any ``await``); outside the server (an in-process call) it is None.
"""

from __future__ import annotations

from contextvars import ContextVar

import attrs

from shyped.control.backend import Access, Peer


@attrs.frozen
class Caller:
    peer: Peer
    #: what the peer may do (``shyped.control.access.Authorizer``): ``admin``, ``read``
    access: Access | None


CALLER: ContextVar[Caller | None] = ContextVar("shyped_control_caller", default=None)
