"""The ``/vm`` and vchan readers (pure)."""

from __future__ import annotations

from collections.abc import Sequence

from shyped.core.assembler.libxl import LibxlReader
from shyped.core.assembler.state import (
    _EMPTY,
    _NO_ENTRIES,
    _Access,
    _Vchan,
)
from shyped.core.channels import guest_path
from shyped.core.events import (
    _VCHAN_KEYS,
)
from shyped.core.xsparse import (
    U32_MAX,
    PermInput,
    is_uuid,
    parse_perms,
    parse_uint,
)


class VmVchanReader(LibxlReader):
    """``/vm/<uuid>`` and the vchan rendezvous nodes under a server's home."""

    def _vm(self, comps: list[str], value: bytes | None) -> None:
        n = len(comps)
        if n == 2:
            if value is None and self._vms:
                self._vms.clear()
                for uuid in self._by_uuid:
                    self._dirty_doms.update(self._with_uuid(uuid))
            return
        uuid = comps[2]
        if value is None:
            if n == 3 and uuid in self._vms:
                self._vms.discard(uuid)
                self._dirty_doms.update(self._with_uuid(uuid))
            return
        if uuid in self._vms or not is_uuid(uuid):
            return
        self._vms.add(uuid)
        self._dirty_doms.update(self._with_uuid(uuid))

    # ---- vchans -------------------------------------------------------------------------

    def _vchan_node(
        self,
        s: int,
        comps: list[str],
        path: str,
        value: bytes | None,
        perms: Sequence[PermInput] | None,
    ) -> None:
        leaf = comps[-1]
        if value is None:
            dom = self._doms.get(s)
            if dom is None or not dom.vchans:
                return
            pre = path + "/"
            for vpath, cand in dom.vchans.items():
                if vpath == path or vpath.startswith(pre):
                    cand.gone = True
                    self._dirty_vchans.add((s, vpath))
            if leaf in _VCHAN_KEYS:
                vpath = path[: -len(leaf) - 1]
                old = dom.vchans.get(vpath)
                if old is not None:
                    if leaf == "ring-ref":
                        old.rr, old.rr_val, old.rr_acc = False, None, None
                    else:
                        old.ec, old.ec_val, old.ec_acc = False, None, None
                    self._index_vchan(s, vpath, old)
                    self._dirty_vchans.add((s, vpath))
            return
        if leaf not in _VCHAN_KEYS or len(comps) < 6 or (s != 0 and not guest_path(path)):
            return  # dom0-only subtrees (store/ring-ref …) are libxl's, never a rendezvous
        vpath = path[: -len(leaf) - 1]
        dom = self._dom(s)
        vc = dom.vchans.get(vpath)
        if vc is None:
            if len(dom.vchans) >= self._limits.vchans_per_domain:
                self._garbage(s, path, "too many vchan rendezvous directories", limit=True)
                p = parse_perms(perms) if perms is not None else None
                if p is None:  # unknown reach: every domain
                    self._shared.over_limit(s, path, _EMPTY, True)
                else:
                    peers = frozenset(d for d, a in p.acl if a != "n" and d not in (0, s))
                    self._shared.over_limit(s, path, peers, p.default != "n")
                return
            if dom.vchans is _NO_ENTRIES:
                dom.vchans = {}
            vc = dom.vchans[vpath] = _Vchan()
            self._vchan_servers.add(s)
        elif vc.gone:
            vc.reset()  # removed and written again within one batch
            self._index_vchan(s, vpath, vc)
        num = parse_uint(value, U32_MAX)
        if num is None:
            self._garbage(s, path, "vchan ring-ref or event-channel is not a uint32")
        acc = None
        if perms is not None:
            p = parse_perms(perms)
            if p is None:
                self._garbage(s, path, "unreadable permissions: treated as readable by all")
                acc = _Access(_EMPTY, True)
            else:
                acc = _Access(p.readers(), p.world_readable)
        if leaf == "ring-ref":
            vc.rr, vc.rr_val = True, num
            if acc is not None:
                vc.rr_acc = acc
        else:
            vc.ec, vc.ec_val = True, num
            if acc is not None:
                vc.ec_acc = acc
        if acc is not None:
            self._index_vchan(s, vpath, vc)
        self._dirty_vchans.add((s, vpath))
