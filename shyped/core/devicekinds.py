"""Which device kinds shyped understands, and the denial of those it does not (pure).

`shyped.core.engine` decides devices with these; the control socket's dry run
(`shyped.control.views`) checks the same kinds the same way."""

from __future__ import annotations

from typing import Final

from shyped.policy.decisions import Decision, Hook, Rule

#: Device kinds whose host resource the label store names (disk image, bridge, 9pfs path):
#: decided by STE between the two domains and between the frontend and the resource.
RESOURCE_KINDS: Final = frozenset({"vbd", "vif", "9pfs", "pci"})
#: Device kinds whose backend serves the frontend from its own state, not from a host
#: resource another label could own: STE between the two domains decides them.
CHANNEL_KINDS: Final = frozenset({"console", "vuart", "vkbd", "vfb", "vtpm"})


def unknown_kind(kind: str, resource: str | None = None) -> Decision | None:
    """A denial for a device kind shyped does not understand (pvcalls, USB, display, sound,
    anything new): each hands the guest a host resource — dom0's network stack, a USB device
    — that no label covers, so STE between the guest and dom0 (whose bootstrap label shares a
    type with everyone) would let it through. A ``pci`` device is understood only with the
    device it passes through (from libxl's ``/libxl/pci/<bdf>`` record, see
    `shyped.core.assembler`): a ``pci`` record without one is not."""
    if kind == "pci" and resource is None:
        return Decision(
            permitted=False,
            hook=Hook.RESOURCE,
            rule=Rule.LABEL,
            reason="a pci device record that names no PCI device gives the guest a host "
            "resource no label covers (not understood by shyped: denied)",
        )
    if kind in RESOURCE_KINDS or kind in CHANNEL_KINDS:
        return None
    return Decision(
        permitted=False,
        hook=Hook.RESOURCE,
        rule=Rule.LABEL,
        reason=f"device kind {kind!r} gives the guest a host resource no label covers "
        "(not understood by shyped: denied)",
    )


__all__ = ["CHANNEL_KINDS", "RESOURCE_KINDS", "unknown_kind"]
