"""The event assembler: xenstore nodes in, typed events (`shyped.core.events`) out. Pure.

`EventAssembler` is the façade; one reader per subtree builds on the shared state, each in its
own module: `state` (the facts and the state), `libxl` (``/libxl`` records), `vms` (``/vm``
and vchans), `local` (``/local/domain``: homes, frontends, backends), `flush` (the derived
events and the reconcile paths)."""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping, Sequence

from shyped.core.assembler.flush import Flusher
from shyped.core.events import (
    Event,
    Node,
    RescanHint,
    SnapshotEntry,
    SortedSnapshot,
)
from shyped.core.xsparse import (
    PermInput,
    parse_domid_component,
    parse_path,
)


class EventAssembler(Flusher):
    """Turns xenstore nodes into typed events; pure and single-threaded (the reactor's)."""

    # ---- public API ---------------------------------------------------------------------

    def feed(
        self,
        path: str | bytes,
        value: bytes | None,
        perms: Sequence[PermInput] | None = None,
    ) -> list[Event]:
        """One node: its path, value (None = absent) and, if `needs_perms`, permissions."""
        self._apply(path, value, perms)
        return self._flush()

    def feed_batch(self, nodes: Iterable[Node]) -> list[Event]:
        """Several nodes (e.g. one transaction's burst); derived events come once at the end."""
        for path, value, perms in nodes:
            self._apply(path, value, perms)
        return self._flush()

    def reconcile(
        self,
        snapshot: Mapping[str, SnapshotEntry] | Mapping[bytes, SnapshotEntry] | SortedSnapshot,
        root: str = "/",
    ) -> list[Event]:
        """Bring the state in line with a full snapshot of the subtree at `root`.

        Everything tracked under `root` that the snapshot lacks is treated as removed, then the
        snapshot's nodes are fed in sorted order. Unchanged facts emit nothing. A
        `SortedSnapshot` (the reconcile scan) is fed as it gives its nodes, already sorted.
        """
        if isinstance(snapshot, SortedSnapshot):
            self._remove_gone(snapshot, root)
            for p, value, perms in snapshot.sorted_items():
                self._apply(p, value, perms)
            return self._flush()
        nodes: Mapping[str, SnapshotEntry] = {
            (k.decode("ascii", "replace") if isinstance(k, bytes) else k): v
            for k, v in snapshot.items()
        }
        self._remove_gone(nodes, root)
        for p in sorted(nodes):
            v = nodes[p]
            if isinstance(v, tuple):
                self._apply(p, v[0], v[1])
            else:
                self._apply(p, v.value, v.perms)
        return self._flush()

    def _remove_gone(self, nodes: Container[str], root: str) -> None:
        """Everything tracked under `root` that `nodes` lacks is removed, shortest first."""
        root = root.rstrip("/") or "/"
        prefix = "/" if root == "/" else root + "/"
        gone = [
            p
            for p in self._tracked_paths()
            if p not in nodes and (root == "/" or p == root or p.startswith(prefix))
        ]
        gone.sort(key=len)
        for p in gone:
            self._apply(p, None, None)

    def withdraw(self, path: str, *, subtree: bool = False) -> tuple[list[Event], list[str]]:
        """The daemon's own veto changed `path` in xenstore: its permissions were reset
        (``ResetPerms``), or, with `subtree`, it and everything below it were removed
        (``RemoveVchan``, ``RemoveNode``). Watch events coalesce and a read shows only the
        node's latest state, so a guest that grants again (or publishes the same rendezvous
        again) before the daemon reads the node would show the very facts emitted before the
        veto, and nothing would be decided. So what was emitted about the shared nodes and
        vchan rendezvous there is withdrawn now (`ChannelUnshared`, `VchanRemoved`), and the
        caller must read the returned paths again (a watch batch): what is there then is new
        and decided again.
        """
        again = self._shared.withdraw(path, subtree)
        comps = path.split("/")
        d = (
            parse_domid_component(comps[3])
            if len(comps) > 4 and comps[1:3] == ["local", "domain"]
            else None
        )
        dom = self._doms.get(d) if d is not None else None
        if dom is not None and subtree:
            pre = path + "/"
            for vpath, vc in dom.vchans.items():
                if vpath == path or vpath.startswith(pre):
                    vc.gone = True
                    self._dirty_vchans.add((dom.domid, vpath))
                    again.extend((vpath + "/ring-ref", vpath + "/event-channel"))
        return self._flush(), sorted(set(again))

    def present_domains(self) -> list[int]:
        """Domain ids currently announced (plus domain 0)."""
        return sorted(d for d, dom in self._doms.items() if d == 0 or dom.emitted is not None)

    def tracked_domains(self) -> int:
        """How many domain ids hold any state (for bounds checks and metrics)."""
        return len(self._doms)

    def tracked_items(self, domid: int) -> int:
        """How many facts are held for one domain id (records, dirs, ring keys, vchans)."""
        dom = self._doms.get(domid)
        if dom is None:
            return 0
        keys = sum(f.ring_keys() + 1 for f in dom.fronts.values())
        return len(dom.records) + keys + len(dom.backs) + len(dom.vchans)

    # ---- dispatch -----------------------------------------------------------------------

    def _apply(
        self, raw: str | bytes, value: bytes | None, perms: Sequence[PermInput] | None
    ) -> None:
        path = parse_path(raw)
        if path is None:
            self._garbage(None, raw, "invalid path")
            return
        if path[0] == "@":
            self._out.append(RescanHint(path))
            return
        comps = path.split("/")
        top = comps[1]
        if top == "local":
            self._local(path, comps, value, perms)
        elif top == "libxl":
            self._libxl(path, comps, value)
        elif top == "vm":
            self._vm(comps, value)
        elif top == "" and value is None:  # "/" itself is gone
            self._remove_all_local()
            self._remove_libxl_all()
            self._vm(["", "vm"], None)
