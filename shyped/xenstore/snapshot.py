"""Subtree walks inside one transaction (worker threads): `Snapshot` (values, children and
optionally every node's permissions) and `Scan`, the compact walk reconcile uses.

Both walk breadth first, one pipelined batch of requests per tree level, in a window larger
than the gateway's default (`WALK_WINDOW`): a walk is thousands of small requests that
xenstored answers in order. A `Scan` keeps per node only ``(value, perms)``, reads the
permissions only of the nodes ``perms_for`` names (in the same batch, inside the same
transaction), never reads the subtrees ``prune`` names, and shares the identical permission
lists and short values between nodes: its peak memory is a small multiple of what the
consumer keeps, not of the whole tree with every node's children.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import attrs

from shyped.xenstore import wire
from shyped.xenstore.blocking import _Channel
from shyped.xenstore.errors import ConnectionLost, NoEntry, XenstoreError
from shyped.xenstore.gatewayconfig import GatewayConfig, Node, Snapshot
from shyped.xenstore.router import _encode_path, _join, _Router
from shyped.xenstore.wire import Op, Perm

T = TypeVar("T")

#: Requests (and bytes of them) in flight during a walk: a level of a large tree is tens of
#: thousands of requests; a wider window means fewer thread wake-ups per level.
WALK_WINDOW = 256
WALK_WINDOW_BYTES = 64 * 1024
#: Values at most this long are shared between nodes (``"4"``, ``"1"``, ``""``, ``"vif"``...).
_SHARE_VALUE_MAX = 16

#: One scanned node: its value and, where asked for, its permissions (owner first).
ScanEntry = tuple[bytes, "tuple[Perm, ...] | None"]


@attrs.frozen
class Scan:
    """A subtree read in one transaction, compactly: ``entries`` maps absolute path to
    ``(value, perms)`` (perms only for the paths ``perms_for`` named, else None), parents
    first; pruned subtrees are absent. ``consistent``/``attempts`` as for `Snapshot`."""

    root: str
    entries: dict[str, ScanEntry]
    consistent: bool
    attempts: int


def _check_root(root: str) -> Exception | None:
    """Why `root` cannot be walked (None: it can)."""
    try:
        _encode_path(root)
    except (ValueError, TypeError) as exc:
        return exc
    if not root.startswith("/"):
        return ValueError(f"snapshot root must be absolute, got {root!r}")
    return None


def _walk_config(config: GatewayConfig) -> GatewayConfig:
    return attrs.evolve(
        config,
        max_inflight=max(config.max_inflight, WALK_WINDOW),
        max_inflight_bytes=max(config.max_inflight_bytes, WALK_WINDOW_BYTES),
    )


#: Nodes whose requests are pipelined in one call: a level of a large tree is read in slices,
#: so that the waiters, payloads and replies of one slice at a time exist, not of the level.
_SLICE = 512

#: One node as a walk reads it: path, value, children, permissions (None: not asked for).
_Read = tuple[str, bytes, tuple[str, ...], "tuple[Perm, ...] | None"]


def _read_tree(
    channel: _Channel,
    root: str,
    prune: Callable[[str], bool],
    perms_for: Callable[[str], bool],
) -> Iterator[_Read]:
    """Breadth first: each level in pipelined slices of `_SLICE` nodes (READ, DIRECTORY and,
    where `perms_for`, GET_PERMS each); a node removed since its parent's listing is left out,
    and so is every child `prune` names. Identical permission lists share one tuple."""
    perm_cache: dict[bytes, tuple[Perm, ...]] = {}
    level = [] if prune(root) else [root]
    while level:
        next_level: list[str] = []
        for first in range(0, len(level), _SLICE):
            part = level[first : first + _SLICE]
            wants = [perms_for(path) for path in part]
            requests: list[tuple[int, bytes, str | None]] = []
            for path, want in zip(part, wants, strict=True):
                raw = wire.path_payload(_encode_path(path))
                requests.append((Op.READ, raw, path))
                requests.append((Op.DIRECTORY, raw, path))
                if want:
                    requests.append((Op.GET_PERMS, raw, path))
            results = channel.pipeline(requests)
            at = 0
            for path, want in zip(part, wants, strict=True):
                count = 3 if want else 2
                answers = results[at : at + count]
                at += count
                if any(isinstance(a, NoEntry) for a in answers):
                    continue  # removed between its parent's listing and now
                for answer in answers:
                    if isinstance(answer, XenstoreError):
                        raise answer
                value, listing = answers[0], answers[1]
                assert isinstance(value, bytes) and isinstance(listing, bytes)
                perms: tuple[Perm, ...] | None = None
                if want:
                    raw_perms = answers[2]
                    assert isinstance(raw_perms, bytes)
                    perms = perm_cache.get(raw_perms)
                    if perms is None:
                        perms = perm_cache[raw_perms] = wire.perms(raw_perms)
                kids = wire.children(listing)
                yield path, value, kids, perms
                next_level.extend(c for c in (_join(path, k) for k in kids) if not prune(c))
        level = next_level


def _never(path: str) -> bool:
    return False


def _always(path: str) -> bool:
    return True


def _walk(channel: _Channel, root: str, with_perms: bool) -> dict[str, Node]:
    """Every node under `root`: value, children, permissions (if `with_perms`)."""
    return {
        path: Node(value, kids, perms)
        for path, value, kids, perms in _read_tree(
            channel, root, _never, _always if with_perms else _never
        )
    }


def _scan(
    channel: _Channel,
    root: str,
    prune: Callable[[str], bool],
    perms_for: Callable[[str], bool],
) -> dict[str, ScanEntry]:
    """``(value, perms)`` per node; children are not kept; short values are shared."""
    entries: dict[str, ScanEntry] = {}
    values: dict[bytes, bytes] = {}
    for path, value, _kids, perms in _read_tree(channel, root, prune, perms_for):
        if len(value) <= _SHARE_VALUE_MAX:
            value = values.setdefault(value, value)
        entries[path] = (value, perms)
    return entries


def _in_transaction(
    router: _Router, config: GatewayConfig, walk: Callable[[_Channel], T], empty: T
) -> tuple[T, bool, int]:
    """Run `walk` in a transaction until one commits (consistent) or the attempts are spent
    (the last, possibly inconsistent, walk is returned)."""
    config = _walk_config(config)
    channel = _Channel(router, config)
    delay = config.tx_backoff_initial
    result = empty
    for attempt in range(1, config.snapshot_attempts + 1):
        tx_id = channel.start()
        result = empty  # let the previous attempt's walk go before the next is read
        try:
            result = walk(_Channel(router, config, tx_id))
        except ConnectionLost:
            raise
        except BaseException:
            channel.abort_quietly(tx_id)
            raise
        if channel.end(tx_id, commit=True):
            return result, True, attempt
        if attempt < config.snapshot_attempts:
            time.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, config.tx_backoff_max)
    return result, False, config.snapshot_attempts


def _run_snapshot(router: _Router, config: GatewayConfig, root: str, with_perms: bool) -> Snapshot:
    empty: dict[str, Node] = {}
    nodes, consistent, attempts = _in_transaction(
        router, config, lambda ch: _walk(ch, root, with_perms), empty
    )
    return Snapshot(root, nodes, consistent=consistent, attempts=attempts)


def _run_scan(
    router: _Router,
    config: GatewayConfig,
    root: str,
    prune: Callable[[str], bool],
    perms_for: Callable[[str], bool],
) -> Scan:
    empty: dict[str, ScanEntry] = {}
    entries, consistent, attempts = _in_transaction(
        router, config, lambda ch: _scan(ch, root, prune, perms_for), empty
    )
    return Scan(root, entries, consistent=consistent, attempts=attempts)
