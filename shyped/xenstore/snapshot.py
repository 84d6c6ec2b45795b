"""Subtree walks inside one transaction (worker threads): `Snapshot` (values, children and
optionally every node's permissions) and `Scan`, the compact walk reconcile uses.

Both walk breadth first, one pipelined batch of requests per tree level, in a window larger
than the gateway's default (`WALK_WINDOW`): a walk is thousands of small requests that
xenstored answers in order. A `Scan` keeps per node only ``(value, perms)``, reads the
permissions only of the nodes ``perms_for`` names (in the same batch, inside the same
transaction), never reads the subtrees ``prune`` names, and holds the nodes packed and sorted
(`ScanEntries`): a reconcile feeds them to the assembler one at a time.
"""

from __future__ import annotations

import random
import time
from array import array
from collections.abc import Callable, Iterator
from typing import TypeVar

import attrs

from shyped.xenstore import listing, wire
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

#: One scanned node: its value and, where asked for, its permissions (owner first).
ScanEntry = tuple[bytes, "tuple[Perm, ...] | None"]


class ScanEntries:
    """The nodes of a scan, packed: paths, values and raw permission lists one after the
    other in one buffer, in the order they were read, with an offset table and the sorted
    order as an index table. A reconcile of 5,000 domains walks some 800,000 nodes; as
    Python objects (a str, a bytes and a tuple each, in a dict, the permissions parsed) they
    took some 200 bytes a node, spread over memory the daemon's lasting objects come to
    share, so the resident set stayed at that peak after they were freed. Packed, they are
    a few large blocks, freed whole, and a node is an object only while it is fed
    (`sorted_items`). A `SortedSnapshot`."""

    __slots__ = ("_at", "_blob", "_order", "_parsed")

    def __init__(self) -> None:
        self._blob = bytearray()
        #: where each node's path, value and raw permissions end (empty permissions: not
        #: asked for), three offsets a node after a leading 0
        self._at = array("Q", [0])
        #: node numbers in path order (`sort`)
        self._order = array("I")
        #: GET_PERMS replies parsed so far (made on the reactor, as the nodes are fed)
        self._parsed: dict[bytes, tuple[Perm, ...]] = {}

    def add(self, path: str, value: bytes, perms: bytes | None) -> None:
        blob, at = self._blob, self._at
        blob += path.encode("ascii")
        at.append(len(blob))
        blob += value
        at.append(len(blob))
        if perms is not None:
            blob += perms
        at.append(len(blob))

    def sort(self) -> None:
        """Order the nodes by path (the keys exist only during the sort)."""
        self._order = array("I", sorted(range(len(self)), key=self._raw_path))

    def __len__(self) -> int:
        return (len(self._at) - 1) // 3

    def _raw_path(self, j: int) -> bytes:
        return bytes(self._blob[self._at[3 * j] : self._at[3 * j + 1]])

    def _path(self, i: int) -> str:
        j = self._order[i]
        return self._blob[self._at[3 * j] : self._at[3 * j + 1]].decode("ascii")

    def _entry(self, i: int) -> ScanEntry:
        j, at, blob = self._order[i], self._at, self._blob
        value = bytes(blob[at[3 * j + 1] : at[3 * j + 2]])
        if at[3 * j + 2] == at[3 * j + 3]:
            return value, None
        raw = bytes(blob[at[3 * j + 2] : at[3 * j + 3]])
        perms = self._parsed.get(raw)
        if perms is None:
            perms = self._parsed[raw] = wire.perms(raw)
        return value, perms

    def _find(self, path: object) -> int:
        """The sorted index of `path`, or -1."""
        if not isinstance(path, str):
            return -1
        lo, hi = 0, len(self)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._path(mid) < path:
                lo = mid + 1
            else:
                hi = mid
        return lo if lo < len(self) and self._path(lo) == path else -1

    def __contains__(self, path: object) -> bool:
        return self._find(path) >= 0

    def get(self, path: str) -> ScanEntry | None:
        i = self._find(path)
        return None if i < 0 else self._entry(i)

    def sorted_items(self) -> Iterator[tuple[str, bytes, tuple[Perm, ...] | None]]:
        """Every node, sorted by path: (path, value, perms)."""
        for i in range(len(self)):
            value, perms = self._entry(i)
            yield self._path(i), value, perms


@attrs.frozen(eq=False)
class Scan:
    """A subtree read in one transaction, compactly: `entries` holds each node's value and
    (only where ``perms_for`` named its path) permissions, sorted by path; pruned subtrees
    are absent. ``consistent``/``attempts`` as for `Snapshot`."""

    root: str
    entries: ScanEntries
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

#: One node as a walk reads it: path, value, children, GET_PERMS reply (None: not asked for).
_Read = tuple[str, bytes, tuple[str, ...], bytes | None]


def _read_tree(
    channel: _Channel,
    root: str,
    prune: Callable[[str], bool],
    perms_for: Callable[[str], bool],
) -> Iterator[_Read]:
    """Breadth first: each level in pipelined slices of `_SLICE` nodes (READ, DIRECTORY and,
    where `perms_for`, GET_PERMS each); a node removed since its parent's listing is left out,
    and so is every child `prune` names."""
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
                for i, answer in enumerate(answers):  # a long list (1) is read in parts
                    if isinstance(answer, XenstoreError) and not (
                        i == 1 and listing.is_too_big(answer)
                    ):
                        raise answer
                try:
                    kids = _children(channel, path, answers[1])
                except NoEntry:
                    continue  # removed while its list was read in parts
                value = answers[0]
                assert isinstance(value, bytes)
                perms = answers[2] if want else None
                assert perms is None or isinstance(perms, bytes)
                yield path, value, kids, perms
                next_level.extend(c for c in (_join(path, k) for k in kids) if not prune(c))
        level = next_level


def _children(channel: _Channel, path: str, answer: bytes | XenstoreError) -> tuple[str, ...]:
    """The child names of a DIRECTORY answer; a list xenstored refused as longer than a
    message (C xenstored: E2BIG) is read in parts, in the walk's transaction (`listing`)."""
    if isinstance(answer, bytes):
        return wire.children(answer)
    if not listing.is_too_big(answer):
        raise answer
    raw = _encode_path(path)
    return listing.read_parts(lambda op, payload: channel.call(op, payload, path), path, raw)


def _never(path: str) -> bool:
    return False


def _always(path: str) -> bool:
    return True


def _walk(channel: _Channel, root: str, with_perms: bool) -> dict[str, Node]:
    """Every node under `root`: value, children, permissions (if `with_perms`; identical
    lists share one tuple)."""
    parsed: dict[bytes, tuple[Perm, ...]] = {}
    nodes: dict[str, Node] = {}
    for path, value, kids, raw in _read_tree(
        channel, root, _never, _always if with_perms else _never
    ):
        perms = None if raw is None else parsed.get(raw)
        if raw is not None and perms is None:
            perms = parsed[raw] = wire.perms(raw)
        nodes[path] = Node(value, kids, perms)
    return nodes


def _scan(
    channel: _Channel,
    root: str,
    prune: Callable[[str], bool],
    perms_for: Callable[[str], bool],
) -> ScanEntries:
    """Every node, packed as it is read (`ScanEntries`); children are not kept."""
    entries = ScanEntries()
    for path, value, _, perms in _read_tree(channel, root, prune, perms_for):
        entries.add(path, value, perms)
    entries.sort()
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
    entries, consistent, attempts = _in_transaction(
        router, config, lambda ch: _scan(ch, root, prune, perms_for), ScanEntries()
    )
    return Scan(root, entries, consistent=consistent, attempts=attempts)
