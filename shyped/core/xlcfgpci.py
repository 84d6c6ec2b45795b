"""PCI passthrough specs (``pci = [...]`` in xl.cfg, ``xl pci-attach``) read as libxlutil 4.17
reads them (tools/libs/util/libxlu_pci.c xlu_pci_parse_spec_string) for a strict subset, or
refused. Pure.

Accepted: a positional ``[SSSS:]BB:DD.F`` (hex) with an optional ``@VSLOT``, or ``bdf=...``,
then ``key=value`` options among ``vslot``, ``permissive``, ``msitranslate``, ``seize``,
``power_mgmt``, ``rdm_policy``. Refused: ``name=`` (a device named through ``xl
pci-assignable-add -n``: which device it is would be read from xenstore at attach time, not
from the spec), a missing or doubled device, unknown keys, blanks or control characters.
The result is the device as libxl prints it (``PCI_BDF``, lower-case hex with the segment):
the resource ``pci:SSSS:BB:DD.F`` shyped labels.
"""

from __future__ import annotations

import re
from typing import Final

from shyped.core.xlcfgfile import XlConfigError

_BDF: Final = re.compile(
    r"(?:(?P<seg>[0-9a-fA-F]{1,4}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<dev>[0-9a-fA-F]{1,2})"
    r"\.(?P<fn>[0-7])(?:@(?P<vslot>[0-9a-fA-F]{1,2}))?"
)
_OPTIONS: Final = frozenset(
    {"vslot", "permissive", "msitranslate", "seize", "power_mgmt", "rdm_policy"}
)
_VALUE: Final = re.compile(r"[A-Za-z0-9_]{1,16}")


def _bdf(text: str, spec: str) -> str:
    m = _BDF.fullmatch(text)
    if m is None or (m["vslot"] is not None and "@" not in text):
        raise XlConfigError(f"pci spec {spec!r}: {text!r} is not [SSSS:]BB:DD.F")
    seg, bus, dev = int(m["seg"] or "0", 16), int(m["bus"], 16), int(m["dev"], 16)
    if dev > 0x1F:
        raise XlConfigError(f"pci spec {spec!r}: device {dev:#x} is past 0x1f")
    return f"{seg:04x}:{bus:02x}:{dev:02x}.{m['fn']}"


def parse_pci_spec(spec: str) -> str:
    """The PCI device (``SSSS:BB:DD.F``) an xl pci spec passes through, or `XlConfigError`."""
    if any(ord(c) < 0x21 or c == "\x7f" for c in spec):
        raise XlConfigError(f"pci spec {spec[:80]!r}: blanks or control characters refused")
    parts = spec.split(",")
    device: str | None = None
    first, rest = parts[0], parts[1:]
    if "=" not in first:
        device = _bdf(first, spec)
    else:
        rest = parts
    for token in rest:
        key, sep, value = token.partition("=")
        if not sep:
            raise XlConfigError(f"pci spec {spec!r}: {token!r} is not key=value")
        if key == "name":
            raise XlConfigError(
                f"pci spec {spec!r}: name= is refused (which device a name stands for is "
                "read at attach time; give the BDF)"
            )
        if key == "bdf":
            if device is not None:
                raise XlConfigError(f"pci spec {spec!r}: the device is given twice")
            device = _bdf(value, spec)
        elif key not in _OPTIONS or not _VALUE.fullmatch(value):
            raise XlConfigError(f"pci spec {spec!r}: unknown or malformed option {token!r}")
    if device is None:
        raise XlConfigError(f"pci spec {spec!r}: no device (BDF) given")
    return device
