"""The daemon's xenstore edge: a Twisted gateway over pyxs, its errors, and the wire format."""

from shyped.xenstore.blocking import Change, Transaction
from shyped.xenstore.errors import (
    Again,
    ConnectionLost,
    NoEntry,
    PermissionDenied,
    XenstoreError,
)
from shyped.xenstore.gateway import XenstoreGateway
from shyped.xenstore.gatewayconfig import (
    GatewayConfig,
    GatewayStats,
    Node,
    Snapshot,
)
from shyped.xenstore.snapshot import Scan
from shyped.xenstore.wire import Op, Perm

__all__ = [
    "Again",
    "Change",
    "ConnectionLost",
    "GatewayConfig",
    "GatewayStats",
    "NoEntry",
    "Node",
    "Op",
    "Perm",
    "PermissionDenied",
    "Scan",
    "Snapshot",
    "Transaction",
    "XenstoreError",
    "XenstoreGateway",
]
