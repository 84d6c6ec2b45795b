"""The header of an ``xl save`` file, read as xl 4.17 writes it (pure).

``tools/xl/xl.h`` (``struct save_file_header``) and ``tools/xl/xl_saverestore.c``
(``save_domain_core_writeconfig``): 32 bytes of magic ``"Xen saved domain, xl format\\n \\0
\\r"`` (NUL-padded), four ``uint32_t`` in the saving host's byte order (``byteorder`` =
0x01020304, ``mandatory_flags`` with bit 0 = config in JSON and bit 1 = stream v2,
``optional_flags``, ``optional_data_len``), then the optional data: a ``uint32_t`` config
length and the config (libxl's JSON with a trailing NUL), then libxc's memory stream.

Only what admission needs is taken from it (UUID, name, ``c_info.ssid_label``); the file is
untrusted input: sizes are bounded and every field is checked.
"""

from __future__ import annotations

import json
import struct
import uuid as uuidlib
from typing import Any, Final

import attrs

MAGIC: Final = b"Xen saved domain, xl format\n \0 \r".ljust(32, b"\0")
BYTEORDER: Final = 0x01020304
FLAG_JSON: Final = 1 << 0
FLAG_STREAMV2: Final = 1 << 1
HEADER_LEN: Final = 32 + 16
#: Longest config accepted (libxl's JSON of a domain is a few KiB).
MAX_CONFIG: Final = 1024 * 1024


class SaveFileError(ValueError):
    """Not an xl save file, or one whose header cannot be used."""


@attrs.frozen
class SavedDomain:
    uuid: str
    name: str
    seclabel: str | None
    config: dict[str, Any]


def write_header(config: dict[str, Any]) -> bytes:
    """The header and config xl writes before the memory stream (little-endian host)."""
    data = json.dumps(config, indent=4).encode() + b"\0"
    optional = struct.pack("<I", len(data)) + data
    head = struct.pack("<IIII", BYTEORDER, FLAG_JSON | FLAG_STREAMV2, 0, len(optional))
    return MAGIC + head + optional


def read_header(data: bytes) -> SavedDomain:
    """The domain a save file holds, from its first bytes (header and config)."""
    if len(data) < HEADER_LEN or data[:32] != MAGIC:
        raise SaveFileError("not an xl save file (no 'Xen saved domain, xl format' header)")
    for order in ("<", ">"):
        byteorder, mandatory, _optional, optlen = struct.unpack(order + "IIII", data[32:48])
        if byteorder == BYTEORDER:
            break
    else:
        raise SaveFileError("xl save file: unknown byte order")
    if mandatory & ~(FLAG_JSON | FLAG_STREAMV2):
        raise SaveFileError(f"xl save file: unknown mandatory flags 0x{mandatory:x}")
    if not mandatory & FLAG_JSON:
        raise SaveFileError("xl save file: the config is not JSON (an old xl): not supported")
    if optlen < 4 or optlen > MAX_CONFIG + 4 or len(data) < HEADER_LEN + optlen:
        raise SaveFileError("xl save file: optional data missing or too long")
    (clen,) = struct.unpack(order + "I", data[48:52])
    if clen < 1 or clen > optlen - 4:
        raise SaveFileError("xl save file: config length does not fit")
    raw = data[52 : 52 + clen].rstrip(b"\0")
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):
        raise SaveFileError("xl save file: the config is not JSON") from None
    c_info = config.get("c_info") if isinstance(config, dict) else None
    if not isinstance(c_info, dict):
        raise SaveFileError("xl save file: no c_info in the config")
    try:
        uuid = str(uuidlib.UUID(str(c_info.get("uuid"))))
    except ValueError:
        raise SaveFileError("xl save file: no valid c_info.uuid") from None
    name, label = c_info.get("name"), c_info.get("ssid_label")
    if not isinstance(name, str) or not name or len(name) > 128:
        raise SaveFileError("xl save file: no valid c_info.name")
    if label is not None and (not isinstance(label, str) or len(label) > 256):
        raise SaveFileError("xl save file: c_info.ssid_label is not a string")
    return SavedDomain(uuid, name, label, config)
