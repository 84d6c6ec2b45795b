"""The ``/local/domain`` reader: a domain's home, its frontends and backends (pure)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import cast

from shyped.core.assembler.state import (
    _DEVID_MAX,
    _MEMORY_KEYS,
    _MEMORY_KIB_MAX,
    _NO_ENTRIES,
    _VCPU_INDEX_MAX,
    _XENBUS_STATE_MAX,
    NO_BACK,
    _Dom,
    _Front,
    _is_port_key,
    _is_ref_key,
    _short,
    _valid_kind,
    back_facts,
    canon_kind,
    canon_pair,
    ring_drop,
    ring_get,
    ring_put,
)
from shyped.core.assembler.vms import VmVchanReader
from shyped.core.events import (
    DeviceKey,
)
from shyped.core.xsparse import (
    MAX_NAME,
    U32_MAX,
    PermInput,
    is_uuid,
    parse_domid,
    parse_domid_component,
    parse_text,
    parse_uint,
    parse_uint_component,
)


class LocalReader(VmVchanReader):
    """``/local/domain/<domid>``: name, vm pointer, sizes, frontends, backends, shared nodes."""

    def _local(
        self,
        path: str,
        comps: list[str],
        value: bytes | None,
        perms: Sequence[PermInput] | None,
    ) -> None:
        n = len(comps)
        if n < 4:
            if value is None and (n == 2 or comps[2] == "domain"):
                self._remove_all_local()
            return
        if comps[2] != "domain":
            return
        d = parse_domid_component(comps[3])
        if d is None:
            self._garbage(None, path, "domain id in path is not a domain id")
            return
        if n == 4:
            if value is None:
                self._shared.note(d, path, None, None)
                self._shared.domain_gone(d)
                dom = self._doms.get(d)
                if dom is not None:
                    self._home_removed(dom)
            return
        if d != 0 and (value is None or perms is not None):
            self._shared.note(d, path, value, perms)
        if value is None and d not in self._doms:
            return  # nothing tracked there
        sub = comps[4]
        if sub == "device":
            if n >= 7:
                kind = comps[5]
                # pcifront's directory (device/pci/0) is the guest's own: the PCI devices are
                # decided from libxl's /libxl/pci records, never from what the guest writes.
                if kind in ("console", "vuart", "pci") or not _valid_kind(kind):
                    return
                devid = parse_uint_component(comps[6], _DEVID_MAX)
                if devid is None:
                    return  # e.g. device/suspend/event-channel: not a device directory
                self._front(d, kind, devid, comps[7:], path, value)
            elif value is None:
                self._front_prefix_removed(d, comps[5] if n == 6 else None)
        elif sub == "console":
            if n == 5 and value is None:
                self._front_prefix_removed(d, "console")
            else:
                self._front(d, "console", 0, comps[5:], path, value)
        elif sub == "vuart":
            if n >= 6:
                devid = parse_uint_component(comps[5], _DEVID_MAX)
                if devid is not None:
                    self._front(d, "vuart", devid, comps[6:], path, value)
            elif value is None:
                self._front_prefix_removed(d, "vuart")
        elif sub == "backend":
            self._back(d, comps, path, value)
        elif n == 5 and sub == "name":
            self._name(d, path, value)
        elif n == 5 and sub == "vm":
            self._vm_pointer(d, path, value)
        elif (sub == "memory" or sub == "cpu") and self._sizes(d, comps, path, value):
            return
        else:
            self._vchan_node(d, comps, path, value, perms)

    def _name(self, d: int, path: str, value: bytes | None) -> None:
        if d == 0:
            return
        name = None if value is None else parse_text(value, MAX_NAME)
        problem = ""
        if value is not None and name is None:
            problem = (
                f"domain name is not printable UTF-8 of at most {MAX_NAME} bytes: {_short(value)}"
            )
            self._garbage(d, path, "domain name is not printable UTF-8 of bounded length")
        dom = self._dom(d)
        if dom.name != name or dom.name_set != (value is not None) or dom.name_problem != problem:
            dom.name = name
            dom.name_set = value is not None
            dom.name_problem = problem
            self._dirty_doms.add(d)

    def _vm_pointer(self, d: int, path: str, value: bytes | None) -> None:
        """``/local/domain/<d>/vm`` (dom0-only). Once the domain is announced, a value that
        does not parse (or a removal) is only counted: the domain keeps its UUID until its
        home goes (or its ``/vm/<uuid>``). A valid other UUID is a new incarnation."""
        if d == 0:
            return
        uuid = None
        if value is not None:
            if value.startswith(b"/vm/") and len(value) == 40 and value.isascii():
                text = value[4:].decode("ascii")
                if is_uuid(text):
                    uuid = text
            if uuid is None:
                self._garbage(d, path, "vm is not /vm/<uuid>")
        dom = self._dom(d)
        if uuid is None and dom.emitted is not None:
            return
        if dom.uuid != uuid:
            self._set_uuid(dom, uuid)
            self._dirty_doms.add(d)

    def _sizes(self, d: int, comps: list[str], path: str, value: bytes | None) -> bool:
        """``memory/{target,static-max}`` and ``cpu/<n>/availability`` (dom0-written).

        Returns True when a write was fully handled here; removals and other nodes go on to
        the vchan check as before (a removed subtree may hold a rendezvous too).
        """
        n = len(comps)
        sub = comps[4]
        if sub == "memory":
            if n == 5:
                if value is None:
                    dom = self._doms.get(d)
                    if dom is not None and (dom.mem_target is not None or dom.mem_max is not None):
                        dom.mem_target = dom.mem_max = None
                        self._sizes_dirty(d)
                return False
            if n != 6 or comps[5] not in _MEMORY_KEYS:
                return False
            kib = None
            if value is not None:
                kib = parse_uint(value, _MEMORY_KIB_MAX)
                if kib is None:
                    self._garbage(d, path, "memory size is not a KiB count")
            dom = self._doms.get(d) if value is None else self._dom(d)
            if dom is not None:
                if comps[5] == "target":
                    if dom.mem_target != kib:
                        dom.mem_target = kib
                        self._sizes_dirty(d)
                elif dom.mem_max != kib:
                    dom.mem_max = kib
                    self._sizes_dirty(d)
            return value is not None
        # cpu
        if n == 5:
            if value is None:
                dom = self._doms.get(d)
                if dom is not None and dom.cpus:
                    dom.cpus = dom.cpus_on = 0
                    self._sizes_dirty(d)
            return False
        if n > 7 or (n == 7 and comps[6] != "availability"):
            return False
        idx = parse_uint_component(comps[5], _VCPU_INDEX_MAX)
        if idx is None:
            if value is not None:
                self._garbage(d, path, "cpu entry is not a vCPU index")
            return value is not None
        if value is None:
            dom = self._doms.get(d)
            bit = 1 << idx
            if dom is not None and dom.cpus & bit:
                dom.cpus &= ~bit
                dom.cpus_on &= ~bit
                self._sizes_dirty(d)
            return False
        if n == 6:
            return True  # the cpu/<n> directory itself: its availability says more
        online = value == b"online"
        if not online and value != b"offline":
            self._garbage(d, path, "cpu availability is not online or offline")
        dom = self._dom(d)
        bit = 1 << idx
        if not dom.cpus & bit or bool(dom.cpus_on & bit) != online:
            dom.cpus |= bit
            dom.cpus_on = dom.cpus_on | bit if online else dom.cpus_on & ~bit
            self._sizes_dirty(d)
        return True

    def _sizes_dirty(self, d: int) -> None:
        self._dirty_res.add(d)
        self._touched.add(d)

    def _home_removed(self, dom: _Dom) -> None:
        d = dom.domid
        self._dirty_doms.add(d)
        dom.name = None
        dom.name_set = False
        dom.name_problem = ""
        self._set_uuid(dom, None)
        if dom.mem_target is not None or dom.mem_max is not None or dom.cpus:
            dom.mem_target = dom.mem_max = None
            dom.cpus = dom.cpus_on = 0
            self._dirty_res.add(d)
        dom.fronts.clear()
        for bkey in dom.backs:
            dk = self._served_by(d, bkey)
            if dk is not None:
                self._dirty_devs.add(dk)
        dom.backs.clear()
        for path, vc in dom.vchans.items():
            vc.gone = True
            self._dirty_vchans.add((d, path))
        for kind, devid in dom.records:
            self._dirty_devs.add(DeviceKey(kind, d, devid))
        if dom.served:
            self._dirty_devs.update(dom.served.values())
        if dom.shadowed:
            self._dirty_devs.update(dom.shadowed)
        # xenstored drops permissions naming a dead domain (XSA-322): it is no longer a client.
        for s, path in sorted(self._clients.get(d, ())):
            vc = self._doms[s].vchans[path]
            for acc in (vc.rr_acc, vc.ec_acc):
                if acc is not None and d in acc.readers:
                    acc.readers = acc.readers - {d}
            self._index_vchan(s, path, vc)
            self._dirty_vchans.add((s, path))

    def _remove_all_local(self) -> None:
        self._shared.note(0, "/local", None, None)
        for dom in list(self._doms.values()):
            self._home_removed(dom)

    # ---- frontends ----------------------------------------------------------------------

    def _front_prefix_removed(self, d: int, kind: str | None) -> None:
        """``device`` (kind None), ``device/<kind>``, ``console`` or ``vuart`` was removed."""
        dom = self._doms.get(d)
        if dom is None:
            return
        for fkey in list(dom.fronts):
            k = fkey[0]
            if kind is None:
                hit = k != "vuart" and fkey != ("console", 0)
            elif kind == "console":
                hit = fkey == ("console", 0)
            elif kind == "vuart":
                hit = k == "vuart"
            else:
                hit = k == kind and fkey != ("console", 0)
            if hit:
                del dom.fronts[fkey]
                self._front_dirty(dom, fkey)
                self._touched.add(d)

    def _front_dirty(self, dom: _Dom, fkey: tuple[str, int]) -> None:
        if fkey in dom.records:
            self._dirty_devs.add(DeviceKey(fkey[0], dom.domid, fkey[1]))

    def _front(
        self, d: int, kind: str, devid: int, rest: list[str], path: str, value: bytes | None
    ) -> None:
        fkey = (kind, devid)
        nrest = len(rest)
        if value is None:
            dom = self._doms.get(d)
            fe = dom.fronts.get(fkey) if dom is not None else None
            if dom is None or fe is None:
                return
            if nrest == 0:
                del dom.fronts[fkey]
                self._touched.add(d)
            else:
                sub = "/".join(rest)
                pre = sub + "/"
                if sub == "state":
                    fe.state = None

                def keep(k: str) -> bool:
                    return k != sub and not k.startswith(pre)

                fe.refs = ring_drop(fe.refs, keep)
                fe.ports = ring_drop(fe.ports, keep)
            self._front_dirty(dom, fkey)
            return
        if nrest == 0 or nrest > 2:
            return
        name = rest[-1]
        if nrest == 1 and name == "state":
            state = parse_uint(value, _XENBUS_STATE_MAX)
            if state is None:
                self._garbage(d, path, "state is not a XenbusState")
            fe = self._front_get(d, fkey, path)
            if fe is not None and fe.state != state:
                fe.state = state
                self._front_dirty(self._doms[d], fkey)
            return
        if nrest == 1 and name in ("backend-id", "backend"):
            self._check_claim(d, fkey, name, path, value)
            return
        if _is_ref_key(name):
            ref = True
        elif _is_port_key(name):
            ref = False
        else:
            return  # features, mac, protocol …: not ours to judge
        num = parse_uint(value, U32_MAX)
        fe = self._front_get(d, fkey, path)
        if fe is None:
            return
        table = fe.refs if ref else fe.ports
        key = name if nrest == 1 else rest[0] + "/" + name
        held = ring_get(table, key)
        if num is None:
            self._garbage(d, path, "grant ref or port is not a uint32")
            if held is not None:
                table = ring_drop(table, key.__ne__)
            else:
                return
        elif held == num:
            return
        elif held is None and fe.ring_keys() >= self._limits.ring_keys_per_device:
            self._garbage(d, path, "too many ring keys in one device", limit=True)
            return
        else:
            table = ring_put(table, sys.intern(key), num)  # the same few names in every front
        if ref:
            fe.refs = table
        else:
            fe.ports = table
        self._front_dirty(self._doms[d], fkey)

    def _front_get(self, d: int, fkey: tuple[str, int], path: str) -> _Front | None:
        dom = self._dom(d)
        fe = dom.fronts.get(fkey)
        if fe is None:
            if len(dom.fronts) >= self._limits.frontends_per_domain:
                self._garbage(d, path, "too many frontend directories", limit=True)
                return None
            fkey = canon_pair(*fkey)
            fe = dom.fronts[fkey] = _Front()
        return fe

    def _check_claim(
        self, d: int, fkey: tuple[str, int], name: str, path: str, value: bytes
    ) -> None:
        """Count a guest-written backend pointer that disagrees with the record; never use it."""
        dom = self._doms.get(d)
        rec = dom.records.get(fkey) if dom is not None else None
        if rec is None or rec.backend is None:
            return
        be, bkind = rec.backend
        if name == "backend-id":
            if parse_domid(value) != be:
                self._garbage(d, path, "frontend backend-id disagrees with the libxl record")
        elif value != f"/local/domain/{be}/backend/{bkind}/{d}/{fkey[1]}".encode():
            self._garbage(d, path, "frontend backend path disagrees with the libxl record")

    # ---- backends -----------------------------------------------------------------------

    def _back(self, be: int, comps: list[str], path: str, value: bytes | None) -> None:
        n = len(comps)
        if n > 9:
            return
        bkind = comps[5] if n > 5 else None
        fe = parse_domid_component(comps[6]) if n > 6 else None
        devid = parse_uint_component(comps[7], _DEVID_MAX) if n > 7 else None
        if (n > 6 and fe is None) or (n > 7 and devid is None):
            if value is not None:
                self._garbage(be, path, "backend path with a bad frontend id or device id")
            return
        if value is None:
            dom = self._doms.get(be)
            if dom is None:
                return
            if n <= 8:
                for bkey in list(dom.backs):
                    if (
                        (bkind is None or bkey[0] == bkind)
                        and (fe is None or bkey[1] == fe)
                        and (devid is None or bkey[2] == devid)
                    ):
                        del dom.backs[bkey]
                        self._back_dirty(be, bkey)
                        self._touched.add(be)
                return
            assert bkind is not None and fe is not None and devid is not None
            bkey = (bkind, fe, devid)
            bk = dom.backs.get(bkey)
            if bk is not None and comps[8] in ("state", "online"):
                if comps[8] == "state":
                    dom.backs[bkey] = back_facts(None, bk[1])
                else:
                    dom.backs[bkey] = back_facts(bk[0], None)
                self._back_dirty(be, bkey)
            return
        if n != 9:
            return
        assert bkind is not None and fe is not None and devid is not None
        name = comps[8]
        if name == "frontend-id":
            if parse_domid(value) != fe:
                self._garbage(be, path, "backend frontend-id disagrees with its path")
            return
        if name == "state":
            state = parse_uint(value, _XENBUS_STATE_MAX)
            if state is None:
                self._garbage(be, path, "state is not a XenbusState")
            self._back_set(be, (bkind, fe, devid), path, state, 0)
        elif name == "online":
            online = None
            if value in (b"0", b"1"):
                online = value == b"1"
            else:
                self._garbage(be, path, "online is not 0 or 1")
            self._back_set(be, (bkind, fe, devid), path, online, 1)

    def _back_set(
        self, be: int, bkey: tuple[str, int, int], path: str, fact: int | bool | None, at: int
    ) -> None:
        """Set the backend directory's state (`at` 0) or online flag (`at` 1); the directory
        is made if new (not past the per-domain bound, counted)."""
        dom = self._dom(be)
        bk = dom.backs.get(bkey)
        if bk is None:
            if len(dom.backs) >= self._limits.backends_per_domain:
                self._garbage(be, path, "too many backend directories", limit=True)
                return
            # the key object of the device it serves where there is one (equal), else its own
            dk = dom.served.get(bkey) if dom.served else None
            bkey = dk if dk is not None and dk == bkey else (canon_kind(bkey[0]), *bkey[1:])
            bk = NO_BACK
            if dom.backs is _NO_ENTRIES:
                dom.backs = {}
        elif bk[at] == fact:
            return
        if at == 0:
            dom.backs[bkey] = back_facts(fact, bk[1])
        else:
            dom.backs[bkey] = back_facts(bk[0], cast("bool | None", fact))
        if bk is NO_BACK and fact is None:
            return  # made with nothing in it: nothing to tell (as before)
        self._back_dirty(be, bkey)

    def _back_dirty(self, be: int, bkey: tuple[str, int, int]) -> None:
        dk = self._served_by(be, bkey)
        if dk is not None:
            self._dirty_devs.add(dk)
