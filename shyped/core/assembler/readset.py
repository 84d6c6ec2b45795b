"""Which changed paths of a watch batch need not be read: the assembler would not use their
value, whatever it is (pure; `shyped.service.watchbatch` skips them).

Every read costs xenstored about as much as a tenth of a write-and-event round trip (it serves
one request at a time), and a device's transaction fires some 30 events, so the reads the
assembler ignores are a large share of a device decision. A path is skipped only when its
value, present or absent, provably changes nothing the assembler keeps or emits:

* a key of a dom0 backend directory other than ``frontend-id``, ``state`` and ``online``
  (``/local/domain/0/backend/<kind>/<frontend>/<devid>/<key>``, with a well-formed frontend
  and device id), and anything deeper: `_back` ignores them both ways;
* a key of a libxl device record that is not a record key (``_RECORD_KEYS``: ``frontend``,
  ``backend``, ``script``, the resource…) when the record's directory is read in the same
  round: present, such a key does exactly what the present directory does (the domain and
  the record exist); absent, nothing;
* anything below ``/vm/<uuid>`` when ``/vm/<uuid>`` is read in the same round: present, it
  does what ``/vm/<uuid>`` does; absent, nothing.

Guest-owned nodes are always read (with their permissions): a grant can hide in any of them.
The hypothesis test in tests/test_assembler_readset.py feeds random bursts whole and without
these paths and requires the same events.
"""

from __future__ import annotations

from collections.abc import Collection

from shyped.core.assembler.state import _DEVID_MAX, _RECORD_KEYS
from shyped.core.xsparse import parse_domid_component, parse_uint_component

#: Keys of a backend directory the assembler reads (`_back`).
_BACKEND_KEYS = frozenset({"frontend-id", "state", "online"})


def unread_paths(paths: Collection[str]) -> set[str]:
    """The paths of one read round (see the module docstring) whose value is not needed."""
    out: set[str] = set()
    for path in paths:
        comps = path.split("/")
        n = len(comps)
        if n >= 9 and comps[1:5] == ["local", "domain", "0", "backend"]:
            if n > 9 or (
                comps[8] not in _BACKEND_KEYS
                and parse_domid_component(comps[6]) is not None
                and parse_uint_component(comps[7], _DEVID_MAX) is not None
            ):
                out.add(path)
        elif n == 7 and comps[1] == "libxl" and comps[3] == "device":
            if comps[6] not in _RECORD_KEYS and path[: -len(comps[6]) - 1] in paths:
                out.add(path)
        elif n >= 4 and comps[1] == "vm" and "/".join(comps[:3]) in paths:
            out.add(path)
    return out
