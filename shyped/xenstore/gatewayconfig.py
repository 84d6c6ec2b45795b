"""How to reach xenstored and the gateway's bounds, what it returns, and its counters."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs
from twisted.python.threadpool import ThreadPool

from shyped.xenstore.events import EventQueueStats
from shyped.xenstore.wire import Perm


class XenstoreSettings(Protocol):
    """What `GatewayConfig.from_xenstore_config` reads: the daemon's ``[xenstore]`` table
    (:class:`shyped.service.config.XenstoreConfig`), which lives above this layer."""

    @property
    def transport(self) -> str: ...
    @property
    def socket(self) -> os.PathLike[str]: ...
    @property
    def reconnect_max_backoff(self) -> float: ...


class _Reactor(Protocol):
    """What the gateway uses of a Twisted reactor."""

    def callLater(self, delay: float, f: Callable[..., Any], *a: Any, **kw: Any) -> Any: ...

    def callFromThread(self, f: Callable[..., Any], *a: Any, **kw: Any) -> None: ...

    def addSystemEventTrigger(
        self, phase: str, event: str, f: Callable[..., Any], *a: Any, **kw: Any
    ) -> Any: ...

    def removeSystemEventTrigger(self, trigger_id: Any) -> None: ...

    def getThreadPool(self) -> ThreadPool: ...


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.frozen
class GatewayConfig:
    """How to reach xenstored and the gateway's bounds; defaults suit a real dom0."""

    #: ``unix``: xenstored's socket (dom0 toolstack); ``xenbus``: the kernel's xenbus device.
    transport: str = attrs.field(default="unix", validator=attrs.validators.in_(("unix", "xenbus")))
    socket_path: str = "/var/run/xenstored/socket"
    #: None: pyxs's platform default (``/dev/xen/xenbus``, else ``/proc/xen/xenbus``).
    xenbus_path: str | None = None
    #: Reconnect backoff: first delay, growth factor, cap (seconds); each delay is jittered
    #: to a uniform draw in [delay/2, delay] so restarted daemons do not reconnect in step.
    reconnect_initial: float = attrs.field(default=0.05, validator=_positive)
    reconnect_factor: float = attrs.field(default=2.0, validator=_positive)
    reconnect_max: float = attrs.field(default=30.0, validator=_positive)
    #: Distinct watch events pending before new ones are dropped and their watch overflowed.
    max_pending_events: int = attrs.field(default=10_000, validator=_positive)
    #: Watch callbacks run per reactor turn before yielding to other reactor work.
    max_events_per_turn: int = attrs.field(default=1_000, validator=_positive)
    #: Window of unanswered requests per sender (reactor; each worker): count and bytes.
    max_inflight: int = attrs.field(default=32, validator=_positive)
    max_inflight_bytes: int = attrs.field(default=16_384, validator=_positive)
    #: Transaction attempts before giving up with Again; backoff between attempts.
    tx_max_attempts: int = attrs.field(default=16, validator=_positive)
    tx_backoff_initial: float = attrs.field(default=0.001, validator=_positive)
    tx_backoff_max: float = attrs.field(default=0.1, validator=_positive)
    #: Snapshot attempts before returning an inconsistent (but complete) walk.
    snapshot_attempts: int = attrs.field(default=4, validator=_positive)
    workers: int = attrs.field(default=2, validator=_positive)
    #: A second, watch-free connection read and written on the reactor for a watch batch's
    #: reads and the label write (`shyped.xenstore.direct`); ``unix`` transport only.
    direct: bool = True

    @classmethod
    def from_xenstore_config(cls, config: XenstoreSettings, **overrides: Any) -> GatewayConfig:
        """From the daemon's ``[xenstore]`` table
        (:class:`shyped.service.config.XenstoreConfig`)."""
        socket_path = str(config.socket)
        values: dict[str, Any] = {
            "transport": config.transport,
            "socket_path": socket_path,
            "reconnect_max": config.reconnect_max_backoff,
        }
        values.update(overrides)
        return cls(**values)


# -- results ---------------------------------------------------------------------------------


@attrs.frozen
class Node:
    """One node of a :class:`Snapshot`."""

    value: bytes
    children: tuple[str, ...]
    #: None when the snapshot was taken without permissions.
    perms: tuple[Perm, ...] | None


@attrs.frozen
class Snapshot:
    """A subtree read in one transaction: ``nodes`` maps absolute path to node, parents first.

    ``consistent`` is False when every attempt's commit reported a concurrent change (a
    subtree under heavy writes); the walk is then complete but may mix moments.  Watches armed
    before the walk deliver whatever changed, so a reconcile converges either way.
    """

    root: str
    nodes: Mapping[str, Node]
    consistent: bool
    attempts: int


@attrs.frozen
class GatewayStats:
    """Counters for metrics."""

    connected: bool
    reconnects: int
    reconnect_attempts: int
    requests: int
    inflight: int
    backlog: int
    events: EventQueueStats
