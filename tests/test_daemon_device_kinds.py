"""Red team (second round): device kinds whose host resource no label covers — PCI
passthrough, pvcalls (dom0's network stack), USB, display, sound — were decided by STE
between the guest and dom0 alone, and dom0's bootstrap label shares a type with every
guest, so a cfg author could pass any host PCI device to any guest. They are denied now
(rule label) until shyped understands them; known kinds keep their decisions."""

from __future__ import annotations

import pytest
import pytest_twisted
from daemon_helpers import Harness, domcfg, host_fixture

from shyped.policy.decisions import Rule
from shyped.sandbox import devices as D
from shyped.sandbox.toolstack_base import apply_ops
from shyped.sandbox.xsconn import XsConn

__all__ = ["host_fixture"]


def add_device(host: Harness, kind: str, fe: int, back: list[tuple[str, str]]) -> None:
    """What libxl's generic device add writes for `kind` 0 of `fe`, backend dom0 (one
    transaction: the /libxl record, the backend and the frontend directories)."""
    front = [("state", "1"), ("backend-id", "0")]
    ops = D._generic_add_ops(kind, fe, 0, 0, back, front, [])
    with XsConn(str(host.xsd.socket_path)) as xs:
        xs.start()
        apply_ops(xs, ops)
        xs.commit()


@pytest.mark.parametrize(
    ("kind", "back"),
    [
        ("pci", [("dev-0", "0000:03:00.0"), ("key-0", "0000:03:00.0"), ("num_devs", "1")]),
        ("pvcalls", []),
        ("vusb", [("num-ports", "8"), ("usb-ver", "2")]),
        ("vsnd", []),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_device_kind_no_label_covers_is_denied_and_cut(
    host: Harness, kind: str, back: list[tuple[str, str]]
) -> None:
    await host.start()
    a = await host.call(host.ts.create, domcfg("shop-1"))
    await host.settle()
    common = [("frontend-id", str(a)), ("online", "1"), ("state", "1")]
    await host.call(add_device, host, kind, a, common + back)
    await host.settle()
    out = host.last(f"device {kind} {a}/0")
    assert not out.allowed and out.enforced, out.log_line()
    assert out.decision.rule is Rule.LABEL and "no label covers" in out.decision.reason
    assert not host.exists(f"/local/domain/0/backend/{kind}/{a}/0/online")  # cut and removed
    assert host.last(f"domain {a}").allowed  # the domain itself stays admitted
