"""Reconcile's compact scan (`XenstoreGateway.scan`, `shyped.xenstore.snapshot`) decides the
same as the whole-tree snapshot it replaced, on a large sandbox tree in a real oxenstored.

The old reconcile walked every node (value and children) into one snapshot, then read the
permissions of the paths `needs_perms` names; the scan reads those permissions inside its
walk, keeps ``(value, perms)`` per node and leaves out the subtrees `ignored_subtree` names.
Both feed a fresh `EventAssembler`; the events (hence every decision taken from them) must
be equal, on the first reconcile and on a second one after domains came and went.
"""

from __future__ import annotations

import pytest_twisted

from shyped.core.assembler import EventAssembler
from shyped.core.events import DomainAppeared, ignored_subtree, needs_perms
from shyped.core.xlcfg import domain_config_from_text
from shyped.sandbox import layout as L
from shyped.sandbox.toolstack import Toolstack
from shyped.sandbox.toolstack_base import apply_ops
from shyped.sandbox.xenstored import SandboxXenstored
from shyped.sandbox.xsconn import XsConn
from shyped.service.eventpath import published_labels
from shyped.xenstore import GatewayConfig, XenstoreGateway

DOMAINS = 40


def _cfg(i: int) -> str:
    return (
        f'name = "g{i}"\nuuid = "00000000-0000-4000-8000-{i:012x}"\nmemory = 64\n'
        "vif = ['bridge=xenbr0']\n"
        f"disk = ['format=raw,vdev=xvda,access=rw,target=/srv/g{i}.img']\n"
    )


def _decorate(conn: XsConn, domids: list[int], round_: int) -> None:
    """What else a host holds: vchans between guests, nodes a guest shares, labels dom0
    wrote, subtrees the assembler ignores, and garbage."""
    for k, d in enumerate(domids):
        peer = domids[(k + 1) % len(domids)]
        if k % 3 == 0:
            path = f"/local/domain/{d}/data/vchan{round_}"
            apply_ops(conn, L.vchan_server_step(d, peer, path, 8 + k, 20 + k).ops)
        if k % 4 == 1:
            conn.write(f"/local/domain/{d}/data/shared{round_}", "x")
            conn.set_perms(f"/local/domain/{d}/data/shared{round_}", (f"n{d}", f"r{peer}"))
        if k % 5 == 2:
            conn.write(f"/local/domain/{d}/shyped/label", "shop")
        uuid = f"00000000-0000-4000-8000-{d:012x}"
        conn.write(f"/vm/{uuid}/image/ostype", "linux")  # below /vm/<uuid>: ignored
    conn.write(f"/tool/bench{round_}/a/b", "ignored")
    conn.write(f"/local/other{round_}/x", "ignored")
    conn.write(f"/local/domain/bad{round_}/name", "garbage")
    conn.write(f"/libxl/nodomid{round_}", "garbage")


async def _both(gw: XenstoreGateway, old: EventAssembler, new: EventAssembler) -> tuple:
    snap = await gw.snapshot("/", with_perms=True)
    whole = {p: (n.value, n.perms if needs_perms(p) else None) for p, n in snap.nodes.items()}
    scan = await gw.scan("/", ignored_subtree, needs_perms)
    assert scan.consistent and snap.consistent
    scanned = {p: (v, perms) for p, v, perms in scan.entries.sorted_items()}
    assert list(scanned) == sorted(scanned) and len(scanned) == len(scan.entries)
    assert set(scanned) < set(whole)  # the ignored subtrees were left out
    assert not any(ignored_subtree(p) for p in scanned)
    assert all(p in scan.entries and scan.entries.get(p) == e for p, e in scanned.items())
    assert "/tool" not in scan.entries and "/nowhere" not in scan.entries
    labels = published_labels((p, v) for p, (v, _) in scanned.items())
    assert labels and labels == published_labels((p, n[0]) for p, n in whole.items())
    return old.reconcile(whole, "/"), new.reconcile(scan.entries, "/")


@pytest_twisted.ensureDeferred
async def test_scan_reconcile_decides_as_the_whole_snapshot(xenstored: SandboxXenstored) -> None:
    ts = Toolstack(xenstored.socket_path)
    ts.boot_host()
    domids = [ts.create(domain_config_from_text(_cfg(i))) for i in range(DOMAINS)]
    with XsConn(str(xenstored.socket_path)) as conn:
        _decorate(conn, domids, 1)
    gw = XenstoreGateway(GatewayConfig(socket_path=str(xenstored.socket_path)))
    await gw.connect()
    try:
        old, new = EventAssembler(), EventAssembler()
        first_old, first_new = await _both(gw, old, new)
        assert first_new == first_old
        appeared = {e.domid for e in first_new if isinstance(e, DomainAppeared)}
        assert set(domids) <= appeared  # not a vacuous comparison
        # Domains come and go, vchans and shares change: a second reconcile on both.
        for d in domids[::4]:
            ts.destroy(d)
        more = [ts.create(domain_config_from_text(_cfg(DOMAINS + i))) for i in range(8)]
        with XsConn(str(xenstored.socket_path)) as conn:
            _decorate(conn, [d for d in domids if d not in domids[::4]] + more, 2)
        second_old, second_new = await _both(gw, old, new)
        assert second_new == second_old
        assert len(second_new) > 8
    finally:
        await gw.close()
