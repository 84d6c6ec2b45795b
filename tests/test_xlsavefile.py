"""xl save file headers (shyped.core.xlsavefile), read as untrusted input."""

from __future__ import annotations

import struct

import pytest

from shyped.core import xlsavefile as x

CONFIG = {"c_info": {"type": "pv", "name": "web-a1", "uuid": "9A000000-0000-4000-8000-0000000000A1",
                     "ssid_label": "ACM:example:web"}}  # fmt: skip


def test_round_trip_in_either_byte_order() -> None:
    data = x.write_header(CONFIG) + b"libxc stream follows"
    saved = x.read_header(data)
    assert (saved.name, saved.uuid, saved.seclabel) == (
        "web-a1", "9a000000-0000-4000-8000-0000000000a1", "ACM:example:web",
    )  # fmt: skip
    little = x.write_header(CONFIG)
    words = struct.unpack("<IIII", little[32:48])
    big = little[:32] + struct.pack(">IIII", *words) + struct.pack(">I", len(little) - 52)
    assert x.read_header(big + little[52:]).name == "web-a1"


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda d: b"Xen saving domain" + d[17:], "not an xl save file"),
        (lambda d: d[:32] + struct.pack("<I", 7) + d[36:], "byte order"),
        (lambda d: d[:36] + struct.pack("<I", 0x10) + d[40:], "mandatory flags"),
        (lambda d: d[:36] + struct.pack("<I", 2) + d[40:], "not JSON"),
        (lambda d: d[:44] + struct.pack("<I", 1 << 30) + d[48:], "too long"),
        (lambda d: d[:48] + struct.pack("<I", 1 << 20) + d[52:], "does not fit"),
        (lambda d: d[:60], "missing"),
    ],
)
def test_bad_headers_are_refused(mutate: object, why: str) -> None:
    with pytest.raises(x.SaveFileError, match=why):
        x.read_header(mutate(x.write_header(CONFIG)))  # type: ignore[operator]


def test_config_without_a_valid_uuid_is_refused() -> None:
    for c_info in (
        {"name": "a"},
        {"name": "a", "uuid": "nope"},
        {"uuid": CONFIG["c_info"]["uuid"]},
    ):
        with pytest.raises(x.SaveFileError):
            x.read_header(x.write_header({"c_info": c_info}))
