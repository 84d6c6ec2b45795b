"""The derived events: what the facts gathered by the readers add up to (pure)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from shyped.core.assembler.local import LocalReader
from shyped.core.assembler.state import (
    _EMPTY,
    GUEST_TYPES,
    NO_BACK,
    PV_ONLY_NIC_TYPES,
    _Dom,
    _Record,
    record_key_names,
    resource_with_script,
)
from shyped.core.channels import (
    device_dir_of,
)
from shyped.core.events import (
    _VCHAN_KEYS,
    BackendStateChanged,
    DeviceAdded,
    DeviceKey,
    DeviceRemoved,
    DomainAppeared,
    DomainResources,
    DomainVanished,
    Event,
    FrontendStateChanged,
    RingsPublished,
    RingsWithdrawn,
    VchanPublished,
    VchanRemoved,
    frontend_dir,
)
from shyped.core.xsparse import (
    parse_domid_component,
)


class Flusher(LocalReader):
    """Turns the dirty facts into typed events, and lists the paths a reconcile must read."""

    def _flush(self) -> list[Event]:
        out = self._out
        self._out = []
        if not (
            self._shared.pending()
            or self._dirty_doms
            or self._dirty_devs
            or self._dirty_vchans
            or self._touched
            or self._dirty_res
        ):
            return out
        vanished: list[int] = []
        if self._dirty_doms:
            doms = sorted(self._dirty_doms)
            self._dirty_doms.clear()
            self._touched.update(doms)
            start = len(out)
            gone: dict[str, int] = {}
            for d in doms:
                self._flush_domain(d, out, vanished, gone)
            if gone:
                vanished = self._restarts_after_vanish(out, start, vanished, gone)
        if self._dirty_res:
            res = sorted(self._dirty_res)
            self._dirty_res.clear()
            for d in res:
                self._flush_resources(d, out)
        if self._dirty_devs:
            devs = sorted(self._dirty_devs) if len(self._dirty_devs) > 1 else list(self._dirty_devs)
            self._dirty_devs.clear()
            for dk in devs:
                self._flush_device(dk, out)
        if self._dirty_vchans:
            vcs = sorted(self._dirty_vchans)
            self._dirty_vchans.clear()
            for s, vpath in vcs:
                self._flush_vchan(s, vpath, out)
        out.extend(self._shared.flush(self._covered))
        if vanished:
            out.extend(DomainVanished(d) for d in vanished)
        if self._touched:
            for d in self._touched:
                dom = self._doms.get(d)
                if dom is not None and dom.empty():
                    del self._doms[d]
            self._touched.clear()
        return out

    def _covered(self, owner: int, path: str) -> tuple[frozenset[int], bool]:
        """Who another hook decides for a shared node of `owner` (`shyped.core.channels`): a
        published vchan's clients for its key nodes; for a node in a directory of an announced
        device (per the trusted record) owned by one end of it, the other end; else nobody."""
        leaf = path[path.rfind("/") + 1 :]
        dom = self._doms.get(owner)
        if leaf in _VCHAN_KEYS and dom is not None:
            vc = dom.vchans.get(path[: -len(leaf) - 1])
            if vc is not None and vc.emitted is not None:
                return frozenset(vc.emitted[0]), vc.emitted[1]
        where = device_dir_of(path)
        home = parse_domid_component(path.split("/")[3])
        if where is None or home is None:
            return _EMPTY, False
        side, kind, a, b = where
        if side == "front":  # libxl: frontend keys n<fe>,r<be>; read-only ones n<be>,r<fe>
            hdom = self._doms.get(home)
            rec = hdom.records.get((kind, a)) if hdom is not None else None
            ends = (home, rec.emitted[0]) if rec is not None and rec.emitted else None
        else:
            dk = self._served_by(home, (kind, a, b))
            fdom = self._doms.get(a) if dk is not None else None
            rec = fdom.records.get((dk.kind, dk.devid)) if fdom and dk else None
            ends = (a, home) if rec is not None and rec.emitted else None
        if ends is None or owner not in ends:
            return _EMPTY, False
        return frozenset(ends) - {owner}, False

    @staticmethod
    def _restarts_after_vanish(
        out: list[Event], start: int, vanished: list[int], gone: dict[str, int]
    ) -> list[int]:
        """A domain restarted under its UUID (libxl removes the old home, then creates the new
        domain) may be read in one batch with its old incarnation's removal: the old one's
        `DomainVanished` goes right before the new one's `DomainAppeared` (else the new one
        would find its UUID held by the dead one). The old one's device and vchan removals
        still follow (the host model drops them with the domain). Returns the vanished domains
        still to announce at the end."""
        early: set[int] = set()
        for i in range(len(out) - 1, start - 1, -1):
            e = out[i]
            if isinstance(e, DomainAppeared) and gone.get(e.uuid, e.domid) != e.domid:
                old = gone[e.uuid]
                out.insert(i, DomainVanished(old))
                early.add(old)
        return [d for d in vanished if d not in early]

    def _flush_domain(
        self, d: int, out: list[Event], vanished: list[int], gone: dict[str, int]
    ) -> None:
        """Announce a domain once its creation facts are all there; once announced it is gone
        only when its home ``/local/domain/<d>`` is removed (libxl's clean-up after death,
        with ``@releaseDomain``). A name that does not parse, a removed ``name``, ``vm``,
        ``/vm/<uuid>`` (two domains may share one) or ``/libxl/<d>`` never make it vanish."""
        dom = self._doms.get(d)
        if dom is None or d == 0:
            return
        if dom.emitted is None:
            complete = dom.name_set and dom.libxl and dom.uuid is not None
            if not complete or dom.uuid not in self._vms:
                return
        elif dom.uuid is None:
            gone[dom.emitted[0]] = d
            dom.emitted = None
            vanished.append(d)
            self._wake(dom)
            return
        uuid = dom.uuid
        problem = dom.name_problem
        if dom.dtype is not None and dom.dtype not in GUEST_TYPES:
            what = f"guest type {dom.dtype!r} is not one shyped understands (pv, pvh, hvm)"
            problem = f"{problem}; {what}" if problem else what
        facts = (uuid, dom.name, problem)
        if dom.emitted != facts:
            first = dom.emitted is None
            dom.emitted = facts
            out.append(DomainAppeared(d, uuid, dom.name, problem))
            if first:
                self._wake(dom)

    def _flush_resources(self, d: int, out: list[Event]) -> None:
        dom = self._doms.get(d)
        if dom is None:
            return
        if not self._present(d):
            dom.em_res = None  # the domain's DomainVanished says it all
            return
        facts = dom.resources()
        if facts != dom.em_res:
            dom.em_res = facts
            out.append(DomainResources(d, *(facts or (None, None, None, None))))

    def _wake(self, dom: _Dom) -> None:
        """The domain came or went: re-evaluate everything that depends on its presence."""
        d = dom.domid
        self._dirty_res.add(d)
        self._dirty_devs.update(DeviceKey(k, d, i) for k, i in dom.records)
        if dom.served:
            self._dirty_devs.update(dom.served.values())
        if dom.shadowed:
            self._dirty_devs.update(dom.shadowed)
        self._dirty_vchans.update((d, p) for p in dom.vchans)

    def _flush_device(self, dk: DeviceKey, out: list[Event]) -> None:
        dom = self._doms.get(dk.frontend)
        rkey = (dk.kind, dk.devid)
        rec = dom.records.get(rkey) if dom is not None else None
        if dom is None or rec is None:
            return
        dk = rec.dk  # the same key; the record's object is the one kept
        backend = DM_USB_BACKEND if _device_model_usb(dk.kind, rec) else rec.backend
        active = (
            not rec.gone
            and (rec.frontend_ok or backend is DM_USB_BACKEND)
            and backend is not None
            and self._present(dk.frontend)
            and self._present(backend[0])
        )
        if not active:
            if rec.emitted is not None:
                self._shared.recheck(dk.frontend)
                self._shared.recheck(rec.emitted[0])
                out.append(DeviceRemoved(dk, rec.emitted[0]))
                rec.emitted = None
                rec.em_fe_state = None
                rec.em_be = (None, None)
                rec.em_rings = None
            if rec.gone:
                self._unlink_backend(dk.frontend, dk.kind, dk.devid, rec)
                del dom.records[rkey]
                self._touched.add(dk.frontend)
            return
        assert backend is not None
        be, bkind = backend
        resource = resource_with_script(dk.kind, rec.resource, rec.script)
        facts = (be, bkind, resource, rec.writable, self._emulated(dom, dk.kind, rec))
        if rec.emitted != facts:
            if rec.emitted is not None and rec.emitted[:2] != facts[:2]:
                rec.em_be = (None, None)
            rec.emitted = facts
            self._shared.recheck(dk.frontend)
            self._shared.recheck(be)
            out.append(DeviceAdded(dk, be, bkind, resource, rec.writable, facts[4]))
        fe = dom.fronts.get(rkey)
        state = fe.state if fe is not None else None
        if state != rec.em_fe_state:
            rec.em_fe_state = state
            out.append(FrontendStateChanged(dk, state))
        bdom = self._doms.get(be)
        bk = bdom.backs.get((bkind, dk.frontend, dk.devid)) if bdom is not None else None
        bfacts = NO_BACK if bk is None else bk  # shared tuples (`back_facts`)
        if bfacts != rec.em_be:
            rec.em_be = bfacts
            out.append(BackendStateChanged(dk, be, bfacts[0], bfacts[1]))
        rings = None
        if fe is not None and fe.refs and fe.ports and (state is None or state == 3 or state == 4):
            rings = (fe.refs, fe.ports)  # sorted already, shared with the front
        if rings != rec.em_rings:
            if rings is not None:
                out.append(RingsPublished(dk, rings[0], rings[1]))
            elif rec.em_rings is not None:
                out.append(RingsWithdrawn(dk))
            rec.em_rings = rings

    @staticmethod
    def _emulated(dom: _Dom, kind: str, rec: _Record) -> bool:
        """Whether the guest has the device outside its PV handshake too (libxl 4.17): a PCI
        device (assigned by the hypervisor); a ``vif_ioemu`` NIC (libxl_dm.c: a tap on the
        same bridge for QEMU's emulated NIC); every disk of an HVM guest (libxl_dm.c
        libxl__build_device_model_args_new: QEMU opens the first four as IDE/AHCI disks)."""
        if kind == "pci":
            return rec.pci is not None
        if _device_model_usb(kind, rec):
            return True
        if kind == "vif":
            return rec.rtype is not None and rec.rtype not in PV_ONLY_NIC_TYPES
        return kind == "vbd" and dom.dtype == "hvm"

    def _flush_vchan(self, s: int, vpath: str, out: list[Event]) -> None:
        dom = self._doms.get(s)
        vc = dom.vchans.get(vpath) if dom is not None else None
        if dom is None or vc is None:
            return
        facts = None
        if not vc.gone and vc.rr and vc.ec and self._present(s):
            ra, ea = vc.rr_acc, vc.ec_acc
            if ra is not None and ea is not None:
                if ra.world and ea.world:
                    readers: frozenset[int] = _EMPTY
                elif ra.world:
                    readers = ea.readers
                elif ea.world:
                    readers = ra.readers
                else:
                    readers = ra.readers & ea.readers
                clients = tuple(sorted(readers - {s}))
                world = ra.world and ea.world
                if clients or world:
                    facts = (clients, world, vc.rr_val, vc.ec_val)
        if facts != vc.emitted:
            self._shared.touch(vpath + "/ring-ref")
            self._shared.touch(vpath + "/event-channel")
            if facts is not None:
                out.append(VchanPublished(s, vpath, facts[0], facts[1], facts[2], facts[3]))
            elif vc.emitted is not None:
                out.append(VchanRemoved(s, vpath))
            vc.emitted = facts
        if vc.gone:
            self._index_vchan(s, vpath, vc, drop=True)
            del dom.vchans[vpath]
            if not dom.vchans:
                self._vchan_servers.discard(s)
            self._touched.add(s)

    # ---- reconcile ----------------------------------------------------------------------

    def _tracked_paths(self) -> Iterator[str]:
        """Every node path the current state relies on (directories and their keys)."""
        for d, dom in self._doms.items():
            home = f"/local/domain/{d}"
            sized = dom.mem_target is not None or dom.mem_max is not None or dom.cpus
            if d != 0 and (dom.name or dom.uuid or dom.fronts or dom.backs or dom.vchans or sized):
                yield home
            if dom.mem_target is not None:
                yield home + "/memory/target"
            if dom.mem_max is not None:
                yield home + "/memory/static-max"
            for idx in range(dom.cpus.bit_length()):
                if not dom.cpus >> idx & 1:
                    continue
                yield f"{home}/cpu/{idx}/availability"
            if dom.name is not None:
                yield home + "/name"
            if dom.uuid is not None:
                yield home + "/vm"
            if dom.libxl or dom.records:
                yield f"/libxl/{d}"
            if dom.dtype is not None:
                yield f"/libxl/{d}/type"
            for (kind, devid), rec in dom.records.items():
                if rec.pci is not None:
                    yield f"/libxl/pci/{rec.pci}"
                    yield f"/libxl/pci/{rec.pci}/domid"
                    continue
                base = f"/libxl/{d}/device/{kind}/{devid}"
                yield base
                for k in record_key_names(rec.keys):
                    yield base + "/" + k
            for (kind, devid), fe in dom.fronts.items():
                base = frontend_dir(DeviceKey(kind, d, devid))
                yield base
                if fe.state is not None:
                    yield base + "/state"
                for k, _ in fe.refs:
                    yield base + "/" + k
                for k, _ in fe.ports:
                    yield base + "/" + k
            for (bkind, fe_id, devid), bk in dom.backs.items():
                base = f"{home}/backend/{bkind}/{fe_id}/{devid}"
                yield base
                if bk[0] is not None:
                    yield base + "/state"
                if bk[1] is not None:
                    yield base + "/online"
            for vpath, vc in dom.vchans.items():
                yield vpath
                if vc.rr:
                    yield vpath + "/ring-ref"
                if vc.ec:
                    yield vpath + "/event-channel"
        for u in self._vms:
            yield f"/vm/{u}"
        yield from self._shared.paths()


#: Where a device-model USB controller is served from: QEMU (dom0's, no xenstore backend).
DM_USB_BACKEND: Final = (0, "vusb")


def _device_model_usb(kind: str, rec: _Record) -> bool:
    """An HVM guest's USB controller emulated by QEMU (``usbctrl`` type ``devicemodel``):
    libxl_usb.c gives it backend kind NONE, so libxl__device_generic_add writes only
    ``/libxl/<d>/device/vusb/<n>`` (no frontend, no backend) and QEMU gets the controller and
    the host's USB devices over QMP. It is decided all the same (a kind shyped denies), from
    the record alone."""
    return kind == "vusb" and rec.rtype == "devicemodel"
