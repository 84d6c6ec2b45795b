"""Generic cross-domain xenstore channels: guest-owned nodes that another guest may reach.

Pure (no I/O). `SharedNodeTracker` is the part of `shyped.core.assembler.EventAssembler` that
watches the permissions of every node a guest could own and turns "domain A's node lets domain B
read or write it" into `ChannelShared` / `ChannelUnshared` events, which the host model turns into
decisions at the ``xs-channel`` hook (docs/policy.md).

Why every node (xenstored, Xen 4.17.5 — ``tools/xenstore/xenstored_core.c`` and
``tools/ocaml/xenstored/store.ml``, the oxenstored Debian runs):

* **Who may change permissions**: only the node's owner (or dom0). C xenstored's
  ``do_set_perms`` asks for ``XS_PERM_WRITE | XS_PERM_OWNER`` and refuses an unprivileged
  domain that changes the owner ("Unprivileged domains may not change the owner", EPERM);
  oxenstored's ``Store.setperms`` raises ``Permission_denied`` when a non-dom0 connection
  changes the owner, and ``path_setperms`` checks ``check_owner`` and WRITE. So a guest can set
  any permission list on any node it owns — under any name — but never give a node away, and
  the call fires the node's watch.
* **Where a guest can create nodes**: wherever it may write the parent (``create_node`` /
  ``path_write`` check WRITE on the parent). libxl's trees give a guest write access only
  below its own ``/local/domain/<d>`` (``data``, ``attr``, ``drivers``, ``error``,
  ``feature``, ``control/*`` keys, its frontend directories: see
  ``xen-4.17-reference/layout-connected.txt``), or below a node another guest opened to it.
  Everything a guest can own therefore lives below ``/local/domain/`` (which the daemon
  watches).
* **What a new node inherits**: its parent's permission list. C xenstored makes the
  unprivileged creator the owner ("Inherit permissions, unpriv domains own what they
  create"); oxenstored copies the list including the owner (``Node.create name
  node.Node.perms``). Either way a node created below a shared node is shared the same way.
* **What a permission list means** (``perms.ml`` ``Perms.check``): the first entry names the
  owner (full access) and what every unlisted domain gets; later entries set the access of one
  domain each (``n`` none, ``r``, ``w``, ``b`` both), overriding the default for it. dom0 (the
  privileged toolstack) has every access anyway.

So a *channel* is a node whose first entry names a domain other than 0 (the owner) and whose
list gives some other non-dom0 domain ``r``, ``w`` or ``b`` — named, or through a default other
than ``n`` (then *every* domain may reach it: ``any_domain``). The owner and each such domain are
the parties, whatever the node is called and wherever it is.

Not channels here (they are decided elsewhere):

* a node below the frontend directory of a device in the trusted ``/libxl`` record whose only
  reachable parties are that device's backend domain (the device hook decides that pair), and a
  node below a backend directory of such a device, owned by the backend domain, reaching only
  the device's frontend domain;
* the ``ring-ref`` / ``event-channel`` nodes of a published libxenvchan rendezvous, for the
  clients (or "every domain") its ``vchan`` decision covers: that richer decision stands for
  them; a domain that may reach one of the two nodes without being a client is decided here.

A veto the daemon carried out (permissions reset, rendezvous removed) is reported back with
`SharedNodeTracker.withdraw`: what was emitted about those nodes is forgotten and they are read
again, so a grant the guest makes again before the daemon's next read is decided again even
though its facts equal those decided before the veto (watch events coalesce: the daemon sees
only a node's latest state).

Bounds: at most `TrackerLimits.shared_per_domain` shared nodes are tracked per owner; a node
past the bound is not tracked but reported at once as ``over_limit`` (denied and removed: fail
closed). Unparsable permissions count as readable and writable by every domain.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Final, NamedTuple

import attrs

from shyped.core.xsparse import PermInput, parse_domid_component, parse_perms

_LOCAL_DOMAIN: Final = "/local/domain/"
#: Children of a guest's home that libxl creates owned by dom0 with no guest-owned node below
#: them and no write access for the guest (``n0,r<d>`` in layout-paused/-connected): their
#: permissions are not fetched. Everything else below ``/local/domain/<d>`` (d != 0) is.
DOM0_SUBTREES: Final = frozenset({"name", "vm", "domid", "memory", "cpu", "store", "shyped"})
#: Access letters that reach a node.
_REACH: Final = frozenset("rwb")


class ChannelKey(NamedTuple):
    """A shared node: its owner domain and its path."""

    owner: int
    path: str


@attrs.frozen(slots=True)
class ChannelShared:
    """A guest-owned node reachable by other guests (upsert).

    `peers`: the non-dom0 domains other than the owner it names with ``r``/``w``/``b``;
    `any_domain`: its default lets every domain reach it (or its permissions did not parse).
    `over_limit`: past the per-domain bound, not tracked (denied and removed at once).
    """

    owner: int
    path: str
    peers: tuple[int, ...]
    any_domain: bool
    over_limit: bool = False


@attrs.frozen(slots=True)
class ChannelUnshared:
    """The node is gone, or no other guest may reach it any more."""

    owner: int
    path: str


@attrs.frozen
class TrackerLimits:
    """Per-owner bound on tracked shared nodes (guest-controlled amount)."""

    shared_per_domain: int = 4096


def guest_path(path: str | bytes) -> bool:
    """True for a path a guest could own: below ``/local/domain/<d>`` (d != 0), outside the
    dom0-only subtrees. The gateway fetches these paths' permissions with their values."""
    p = path.decode("ascii", "replace") if isinstance(path, bytes) else path
    if not p.startswith(_LOCAL_DOMAIN):
        return False
    comps = p.split("/", 5)
    if len(comps) < 5:
        return False
    d = parse_domid_component(comps[3])
    if d is None or d == 0:
        return False
    return comps[4] not in DOM0_SUBTREES


Reach = tuple[int, frozenset[int], bool] | None


def reach(raw: Sequence[PermInput]) -> Reach:
    """(owner, other non-dom0 domains it names with access, every domain reaches it) of a
    permission list; None if the owner is dom0 or nobody else may reach it. Unparsable
    permissions: owner unknown, so None is not safe — the caller gets ``(-1, {}, True)``.

    A tuple (what the gateway hands over) is memoised, bounded: every read of a guest's node
    with its permissions comes here, and a host has few distinct lists; the result is
    immutable. Anything unhashable is computed each time."""
    if isinstance(raw, tuple):
        try:
            return _reach_memo(raw)
        except TypeError:
            pass  # an unhashable entry (or a TypeError of its own, raised again below)
    return _reach(raw)


@functools.lru_cache(maxsize=1024)
def _reach_memo(raw: tuple[PermInput, ...]) -> Reach:
    return _reach(raw)


def _reach(raw: Sequence[PermInput]) -> Reach:
    p = parse_perms(raw)
    if p is None:
        return (-1, frozenset(), True)
    if p.owner == 0:
        return None
    peers = frozenset(d for d, letter in p.acl if letter in _REACH and d != 0 and d != p.owner)
    # An ACL entry ``n<d>`` overrides a reaching default for d only: the rest still reach it.
    world = p.default in _REACH
    if not peers and not world:
        return None
    return (p.owner, peers, world)


def device_dir_of(path: str) -> tuple[str, str, int, int] | None:
    """Which device directory a node is in, by path alone (the caller checks the record):

    * ``("front", kind, devid, 0)`` below ``/local/domain/<d>/device/<kind>/<devid>``
      (``console`` for ``/local/domain/<d>/console``, devid 0; ``vuart/<devid>``);
    * ``("back", bkind, fe, devid)`` below ``/local/domain/<d>/backend/<bkind>/<fe>/<devid>``.
    """
    comps = path.split("/")
    n = len(comps)
    if n < 5:
        return None
    sub = comps[4]
    if sub == "console":
        return ("front", "console", 0, 0)
    if sub == "vuart" and n >= 6 and comps[5].isdigit():
        return ("front", "vuart", int(comps[5]), 0)
    if sub == "device" and n >= 7 and comps[6].isdigit() and len(comps[6]) <= 10:
        return ("front", comps[5], int(comps[6]), 0)
    if sub == "backend" and n >= 8:
        fe = parse_domid_component(comps[6])
        if fe is not None and comps[7].isdigit() and len(comps[7]) <= 10:
            return ("back", comps[5], fe, int(comps[7]))
    return None


def _home_of(path: str) -> str:
    """``/local/domain/<d>`` of a path below it."""
    return "/".join(path.split("/", 5)[:4])


class _Shared:
    __slots__ = ("emitted", "peers", "world")

    def __init__(self, peers: frozenset[int], world: bool) -> None:
        self.peers = peers
        self.world = world
        self.emitted: tuple[tuple[int, ...], bool] | None = None  # (peers, any_domain)


#: (owner, node path) -> (domains whose reach another hook decides for that node, and whether
#: that hook also decides its reach by every domain).
ExemptFn = Callable[[int, str], tuple[frozenset[int], bool]]


class SharedNodeTracker:
    """Shared guest-owned nodes per owner; pure and single-threaded (the assembler's).

    `note` is called for every node below ``/local/domain/<d>`` whose permissions the gateway
    passed (value None: the node or an ancestor is gone); `flush` returns the events, asking
    `exempt` which parties of a node the device hook already decides.
    """

    def __init__(self, limits: TrackerLimits | None = None) -> None:
        self._limits = limits or TrackerLimits()
        self._by_owner: dict[int, dict[str, _Shared]] = {}
        self._owner_of: dict[str, int] = {}  # tracked path -> owner
        self._by_home: dict[str, set[str]] = {}  # "/local/domain/<d>" -> tracked paths below
        #: peer domid -> the tracked (owner, path) whose permissions name it (no scan of every
        #: owner's nodes when a domain goes or its records change)
        self._by_peer: dict[int, set[tuple[int, str]]] = {}
        self._dirty: set[ChannelKey] = set()
        self._out: list[ChannelShared | ChannelUnshared] = []

    # ---- input --------------------------------------------------------------------------

    def note(
        self, home: int, path: str, value: bytes | None, perms: Sequence[PermInput] | None
    ) -> None:
        """One node below ``/local/domain/<home>``; perms None with a value: not fetched."""
        if value is None:
            self._removed(path)
            return
        if perms is None:
            return
        r = reach(perms)
        owner = home if r is None or r[0] < 0 else r[0]
        before = self._owner_of.get(path)
        if before is not None and before != owner:  # only dom0 can change an owner
            self._forget(before, path)
        if r is None:
            self._forget(owner, path)
            return
        _, peers, world = r
        nodes: dict[str, _Shared] | None = self._by_owner.get(owner)
        cur = nodes.get(path) if nodes is not None else None
        if cur is None:
            if nodes is not None and len(nodes) >= self._limits.shared_per_domain:
                self.over_limit(owner, path, peers, world)
                return
            if nodes is None:
                nodes = self._by_owner[owner] = {}
            cur = nodes[path] = _Shared(frozenset(), world)
            self._owner_of[path] = owner
            self._by_home.setdefault(_home_of(path), set()).add(path)
            self._set_peers(owner, path, cur, peers)
        else:
            self._set_peers(owner, path, cur, peers)
            cur.world = world
        self._dirty.add(ChannelKey(owner, path))

    def over_limit(self, owner: int, path: str, peers: frozenset[int], world: bool) -> None:
        """Report a node that cannot be tracked: denied and removed (fail closed). A generic
        entry for the same node is dropped: the over-limit denial decides it."""
        before = self._owner_of.get(path)
        if before is not None:
            self._forget(before, path)
        self._out.append(ChannelShared(owner, path, tuple(sorted(peers)), world, True))

    def _removed(self, path: str) -> None:
        pre = path + "/"
        homes = [_home_of(path)] if path.count("/") >= 3 else list(self._by_home)
        for home in homes:
            for p in list(self._by_home.get(home, ())):
                if p == path or p.startswith(pre):
                    self._forget(self._owner_of[p], p)

    def _forget(self, owner: int, path: str) -> None:
        nodes = self._by_owner.get(owner)
        cur = nodes.get(path) if nodes is not None else None
        if cur is not None:
            self._set_peers(owner, path, cur, frozenset())
            cur.world = False
            self._dirty.add(ChannelKey(owner, path))

    def _set_peers(self, owner: int, path: str, cur: _Shared, peers: frozenset[int]) -> None:
        """Set a node's peers and keep `_by_peer` in step."""
        old = cur.peers
        if old == peers:
            return
        key = (owner, path)
        for d in old - peers:
            keys = self._by_peer.get(d)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_peer[d]
        for d in peers - old:
            self._by_peer.setdefault(d, set()).add(key)
        cur.peers = peers

    def domain_gone(self, domid: int) -> None:
        """A domain's home is gone: its nodes went with it, and xenstored drops permissions
        naming a dead domain (XSA-322), so it reaches nobody's nodes any more."""
        nodes = self._by_owner.get(domid)
        if nodes is not None:
            for p, cur in nodes.items():
                self._set_peers(domid, p, cur, frozenset())
                cur.world = False
                self._dirty.add(ChannelKey(domid, p))
        for owner, p in sorted(self._by_peer.get(domid, ())):
            cur = self._by_owner[owner][p]
            self._set_peers(owner, p, cur, cur.peers - {domid})
            self._dirty.add(ChannelKey(owner, p))

    def withdraw(self, path: str, subtree: bool) -> list[str]:
        """The daemon's veto changed `path` (its permissions reset; with `subtree`, it and what
        was below it removed): forget what is tracked there, so that whatever is read there
        next is new and decided again, even if it equals what was emitted before the veto (a
        guest that grants again before the daemon reads the node must not hide behind the
        same facts). Returns the forgotten paths: the caller reads them again."""
        if not subtree:
            owner = self._owner_of.get(path)
            if owner is None:
                return []
            self._forget(owner, path)
            return [path]
        pre = path + "/"
        paths = [p for p in self._by_home.get(_home_of(path), ()) if p == path or p.startswith(pre)]
        for p in paths:
            self._forget(self._owner_of[p], p)
        return sorted(paths)

    def touch(self, path: str) -> None:
        """Re-evaluate one node if it is tracked (what covers it changed)."""
        owner = self._owner_of.get(path)
        if owner is not None:
            self._dirty.add(ChannelKey(owner, path))

    def recheck(self, domid: int) -> None:
        """Re-evaluate every node `domid` owns or reaches (a device record changed)."""
        for p in self._by_owner.get(domid, ()):
            self._dirty.add(ChannelKey(domid, p))
        for owner, p in self._by_peer.get(domid, ()):
            self._dirty.add(ChannelKey(owner, p))

    # ---- output -------------------------------------------------------------------------

    def flush(self, exempt: ExemptFn) -> list[ChannelShared | ChannelUnshared]:
        out, self._out = self._out, []
        if not self._dirty:
            return out
        for key in sorted(self._dirty):
            nodes = self._by_owner.get(key.owner)
            cur = nodes.get(key.path) if nodes is not None else None
            if nodes is None or cur is None:
                continue
            facts: tuple[tuple[int, ...], bool] | None = None
            if cur.world or cur.peers:
                covered, world_covered = exempt(key.owner, key.path)
                if cur.world and not world_covered:
                    facts = ((), True)
                else:
                    peers = cur.peers - covered if not cur.world else frozenset()
                    if peers:
                        facts = (tuple(sorted(peers)), False)
            if facts != cur.emitted:
                if facts is not None:
                    out.append(ChannelShared(key.owner, key.path, facts[0], facts[1]))
                else:
                    out.append(ChannelUnshared(key.owner, key.path))
                cur.emitted = facts
            if not cur.peers and not cur.world:
                del nodes[key.path]
                if self._owner_of.get(key.path) == key.owner:
                    del self._owner_of[key.path]
                    home = _home_of(key.path)
                    paths = self._by_home.get(home)
                    if paths is not None:
                        paths.discard(key.path)
                        if not paths:
                            del self._by_home[home]
                if not nodes:
                    del self._by_owner[key.owner]
        self._dirty.clear()
        return out

    # ---- queries ------------------------------------------------------------------------

    def pending(self) -> bool:
        return bool(self._dirty or self._out)

    def tracked(self, owner: int) -> int:
        nodes = self._by_owner.get(owner)
        return 0 if nodes is None else len(nodes)

    def paths(self) -> Iterator[str]:
        """Every tracked path (reconcile: a path missing from a snapshot is gone)."""
        for nodes in self._by_owner.values():
            yield from nodes
