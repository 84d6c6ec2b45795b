"""The ``/libxl`` reader: the toolstack's device records (pure)."""

from __future__ import annotations

import sys

from shyped.core.assembler.state import (
    _DEVID_MAX,
    _RECORD_KEYS,
    _RESOURCE_KEY,
    RECORD_KEY_BIT,
    AssemblerState,
    _Dom,
    _Record,
    _valid_kind,
    canon_kind,
    canon_pair,
    pci_record_key,
)
from shyped.core.events import (
    _LOCAL_DOMAIN,
    DeviceKey,
    frontend_dir,
)
from shyped.core.xsparse import (
    MAX_VALUE,
    parse_abs_path_value,
    parse_domid,
    parse_domid_component,
    parse_text,
    parse_uint_component,
)


class LibxlReader(AssemblerState):
    """``/libxl/<domid>/device/<kind>/<devid>``: which backend serves a device, and what
    resource it uses."""

    def _remove_libxl_all(self) -> None:
        for comp in list(self._pci):
            self._pci_released(comp)
        for dom in list(self._doms.values()):
            self._libxl_removed(dom, None, None)
            if dom.libxl:
                dom.libxl = False
                self._dirty_doms.add(dom.domid)

    def _libxl_removed(self, dom: _Dom, kind: str | None, devid: int | None) -> None:
        for rkey, rec in dom.records.items():
            if rec.pci is not None:
                continue  # follows /libxl/pci only (libxl's clean-up of device/ empties it)
            if (kind is None or rkey[0] == kind) and (devid is None or rkey[1] == devid):
                rec.gone = True
                self._dirty_devs.add(DeviceKey(rkey[0], dom.domid, rkey[1]))

    def _libxl(self, path: str, comps: list[str], value: bytes | None) -> None:
        n = len(comps)
        if n == 2:
            if value is None:
                self._remove_libxl_all()
            return
        if comps[2] == "pci":
            self._libxl_pci(path, comps, value)
            return
        d = parse_domid_component(comps[2])
        if d is None:
            self._garbage(None, path, "domain id in path is not a domain id")
            return
        if value is None:
            dom = self._doms.get(d)
            if dom is None:
                return
            if n == 3:
                if dom.libxl:
                    dom.libxl = False
                    self._dirty_doms.add(d)
                self._libxl_removed(dom, None, None)
                return
            if n == 4 and comps[3] == "type":
                self._guest_type(dom, None)
                return
            if comps[3] != "device":
                return
            if n <= 6:
                kind = comps[4] if n > 4 else None
                devid = parse_uint_component(comps[5], _DEVID_MAX) if n > 5 else None
                if n > 5 and devid is None:
                    return
                self._libxl_removed(dom, kind, devid)
                return
            if n == 7:
                devid = parse_uint_component(comps[5], _DEVID_MAX)
                if devid is not None:
                    rec = dom.records.get((comps[4], devid))
                    if rec is not None and rec.keys & RECORD_KEY_BIT.get(comps[6], 0):
                        self._record_key_removed(d, comps[4], devid, rec, comps[6])
            return
        dom = self._dom(d)
        if not dom.libxl:
            dom.libxl = True
            self._dirty_doms.add(d)
        if n == 4 and comps[3] == "type":
            self._guest_type(dom, sys.intern(parse_text(value, 16) or "(unreadable)"))
            return
        if n < 6 or comps[3] != "device":
            return
        kind = comps[4]
        devid = parse_uint_component(comps[5], _DEVID_MAX)
        if not _valid_kind(kind) or devid is None:
            self._garbage(None, path, "libxl device record with a bad kind or device id")
            return
        kind = canon_kind(kind)
        rec = self._record_for(dom, kind, devid, path)
        if rec is None:
            return
        dk = rec.dk
        self._dirty_devs.add(dk)
        if n != 7:
            return
        name = comps[6]
        if name not in _RECORD_KEYS:
            return
        rec.keys |= RECORD_KEY_BIT[name]
        if name == "frontend":
            fpath = parse_abs_path_value(value)
            rec.frontend_ok = fpath == frontend_dir(dk)
            if not rec.frontend_ok:
                self._garbage(None, path, "record frontend is not the device's frontend directory")
        elif name == "backend":
            target = self._parse_backend_path(value, d, devid)
            if target is None:
                self._garbage(None, path, "record backend is not a backend directory of it")
            self._link_backend(dk, rec, target)
        elif name == "mode":
            if value not in (b"r", b"w"):
                self._garbage(None, path, "record mode is not r or w")
            rec.writable = value != b"r"
        elif name == "script":
            # the same few scripts and types in every record (dom0-written): one object each
            rec.script = sys.intern(parse_text(value, MAX_VALUE) or "(unreadable)")
        elif name == "type":
            rec.rtype = sys.intern(parse_text(value, 32) or "(unreadable)")
        elif name == _RESOURCE_KEY.get(kind):
            res = parse_text(value, MAX_VALUE)
            if res is None:
                self._garbage(None, path, "record resource is not printable UTF-8")
            elif kind == "vif":
                res = sys.intern(res)  # a bridge: the same few names in every record
            rec.resource = res

    def _record_for(self, dom: _Dom, kind: str, devid: int, path: str) -> _Record | None:
        """The device's record, made if new (None past the per-domain bound, counted)."""
        rkey = (kind, devid)
        rec = dom.records.get(rkey)
        if rec is None:
            if len(dom.records) >= self._limits.records_per_domain:
                self._garbage(None, path, "too many device records", limit=True)
                return None
            rkey = canon_pair(kind, devid)
            rec = dom.records[rkey] = _Record(DeviceKey(kind, dom.domid, devid))
        elif rec.gone:
            rec.reset()  # removed and written again within one batch
            self._unlink_backend(dom.domid, kind, devid, rec)
        return rec

    def _record_key_removed(self, d: int, kind: str, devid: int, rec: _Record, name: str) -> None:
        rec.keys &= ~RECORD_KEY_BIT[name]
        if name == "frontend":
            rec.frontend_ok = False
        elif name == "backend":
            self._unlink_backend(d, kind, devid, rec)
        elif name == "mode":
            rec.writable = True
        elif name == "script":
            rec.script = None
        elif name == "type":
            rec.rtype = None
        else:
            rec.resource = None
        self._dirty_devs.add(DeviceKey(kind, d, devid))

    @staticmethod
    def _parse_backend_path(value: bytes, fe: int, devid: int) -> tuple[int, str] | None:
        p = parse_abs_path_value(value)
        if p is None or not p.startswith(_LOCAL_DOMAIN):
            return None
        comps = p.split("/")
        if len(comps) != 8 or comps[4] != "backend" or not _valid_kind(comps[5]):
            return None
        be = parse_domid_component(comps[3])
        if be is None or parse_domid_component(comps[6]) != fe:
            return None
        if parse_uint_component(comps[7], _DEVID_MAX) != devid:
            return None
        return be, canon_kind(comps[5])

    def _link_backend(self, dk: DeviceKey, rec: _Record, target: tuple[int, str] | None) -> None:
        if rec.backend == target:
            return
        self._unlink_backend(dk.frontend, dk.kind, dk.devid, rec)
        rec.backend = target
        if target is not None:
            be, bkind = target
            bdom = self._dom(be)
            if bdom.served is None:
                bdom.served = {}
            bkey = dk if bkind == dk.kind else (bkind, dk.frontend, dk.devid)
            held = bdom.served.get(bkey)
            if held is not None and held != dk:
                if bdom.shadowed is None:
                    bdom.shadowed = set()
                bdom.shadowed.add(held)
            bdom.served[bkey] = dk

    def _unlink_backend(self, fe: int, kind: str, devid: int, rec: _Record) -> None:
        if rec.backend is None:
            return
        be, bkind = rec.backend
        dk = DeviceKey(kind, fe, devid)
        bdom = self._doms.get(be)
        if bdom is not None:
            bkey = (bkind, fe, devid)
            if bdom.served is not None and bdom.served.get(bkey) == dk:
                del bdom.served[bkey]
                if not bdom.served:
                    bdom.served = None
            if bdom.shadowed is not None:
                bdom.shadowed.discard(dk)
                if not bdom.shadowed:
                    bdom.shadowed = None
            self._touched.add(be)
        rec.backend = None

    def _guest_type(self, dom: _Dom, dtype: str | None) -> None:
        """``/libxl/<domid>/type`` (libxl__domain_make): the guest type decides which of its
        devices the device model also emulates, and an unknown one is an identity problem."""
        if dom.dtype == dtype:
            return
        dom.dtype = dtype
        self._dirty_doms.add(dom.domid)
        self._touched.add(dom.domid)
        self._dirty_devs.update(DeviceKey(k, dom.domid, i) for k, i in dom.records)

    def _libxl_pci(self, path: str, comps: list[str], value: bytes | None) -> None:
        """``/libxl/pci/<SSSS-BB-DD-F>/domid``: libxl_pci.c's record of which domain a PCI
        device is assigned to (pci_info_xs_write, dom0-only like all of ``/libxl``; written
        before the device is assigned, removed after it is released). libxl writes no
        ``/libxl/<domid>/device/pci`` record, so this is the trusted one: it becomes the
        device ``pci`` of that domain, served by dom0 (pciback), using resource
        ``pci:SSSS:BB:DD.F``."""
        n = len(comps)
        if value is None:
            if n == 3:
                for comp in list(self._pci):
                    self._pci_released(comp)
            elif n == 4 or (n == 5 and comps[4] == "domid"):
                self._pci_released(comps[3])
            return
        if n != 5 or comps[4] != "domid":
            return  # the directory itself, driver_path, name: not ours to judge
        d = parse_domid(value)
        if d is None:
            self._garbage(None, path, "PCI assignment domid is not a domain id")
            return
        comp = comps[3]
        held = self._pci.get(comp)
        if held is not None and held[0] != d:
            self._pci_released(comp)
        devid, resource = pci_record_key(comp)
        rec = self._record_for(self._dom(d), "pci", devid, path)
        if rec is None:
            return
        rec.pci = comp
        rec.frontend_ok = True
        rec.resource = resource
        dk = rec.dk
        self._link_backend(dk, rec, (0, "pci"))
        self._pci[comp] = (d, devid)
        self._dirty_devs.add(dk)

    def _pci_released(self, comp: str) -> None:
        held = self._pci.pop(comp, None)
        if held is None:
            return
        dom = self._doms.get(held[0])
        rec = dom.records.get(("pci", held[1])) if dom is not None else None
        if rec is not None and rec.pci == comp:
            rec.gone = True
            self._dirty_devs.add(DeviceKey("pci", held[0], held[1]))
