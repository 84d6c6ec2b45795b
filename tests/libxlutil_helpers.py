"""Debian's real libxlutil (xen-utils-4.17 / libxenmisc4.17) through ctypes, to read an xl.cfg
exactly as ``xl create`` does. Signatures from tools/include/libxlutil.h (Xen 4.17)."""

from __future__ import annotations

import ctypes
import glob
import json
from typing import Any

_PATHS = sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libxlutil.so.4.17*"))
_LIGHT_PATHS = sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libxenlight.so.4.17*"))
#: libxl_device_disk is ~200 bytes in 4.17; room to spare.
_DISK_BUF = 4096

LibValue = bytes | list[bytes | None]


class LibXlUtil:
    """``xlu_cfg_init`` / ``xlu_cfg_readdata`` / ``xlu_cfg_get_string`` / ``xlu_cfg_get_list``
    + ``xlu_cfg_get_listitem`` / ``xlu_cfg_destroy``."""

    def __init__(self, path: str) -> None:
        lib: Any = ctypes.CDLL(path)
        libc: Any = ctypes.CDLL(None)
        libc.fopen.restype = ctypes.c_void_p
        libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        self._report = libc.fopen(b"/dev/null", b"w")
        lib.xlu_cfg_init.restype = ctypes.c_void_p
        lib.xlu_cfg_init.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.xlu_cfg_readdata.restype = ctypes.c_int
        lib.xlu_cfg_readdata.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        lib.xlu_cfg_get_string.restype = ctypes.c_int
        lib.xlu_cfg_get_string.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.c_int,
        ]
        lib.xlu_cfg_get_list.restype = ctypes.c_int
        lib.xlu_cfg_get_list.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_int,
        ]
        lib.xlu_cfg_get_listitem.restype = ctypes.c_char_p
        lib.xlu_cfg_get_listitem.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.xlu_cfg_destroy.restype = None
        lib.xlu_cfg_destroy.argtypes = [ctypes.c_void_p]
        self._lib = lib
        self._libc = libc
        self._light: Any = None

    def _disk_lib(self) -> Any:
        if self._light is None:
            light: Any = ctypes.CDLL(_LIGHT_PATHS[0])
            light.libxl_device_disk_init.restype = None
            light.libxl_device_disk_init.argtypes = [ctypes.c_void_p]
            light.libxl_device_disk_dispose.restype = None
            light.libxl_device_disk_dispose.argtypes = [ctypes.c_void_p]
            light.libxl_device_disk_to_json.restype = ctypes.c_void_p
            light.libxl_device_disk_to_json.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            self._lib.xlu_disk_parse.restype = ctypes.c_int
            self._lib.xlu_disk_parse.argtypes = [
                ctypes.c_void_p,
                ctypes.c_int,
                ctypes.POINTER(ctypes.c_char_p),
                ctypes.c_void_p,
            ]
            self._libc.free.restype = None
            self._libc.free.argtypes = [ctypes.c_void_p]
            self._light = light
        return self._light

    def disk(self, specs: list[bytes]) -> int | dict[str, Any]:
        """``xlu_disk_parse(cfg, len(specs), specs, &disk)`` as ``xl`` calls it: its error
        code, or the libxl_device_disk it filled, as libxl's own JSON generator
        (``libxl_device_disk_to_json``) writes it, so no field offset is hard-coded here.
        Fields at their default (0, NULL, "unknown") are absent from that JSON."""
        light = self._disk_lib()
        cfg = self._lib.xlu_cfg_init(self._report, b"differential")
        buf = ctypes.create_string_buffer(_DISK_BUF)
        light.libxl_device_disk_init(buf)
        try:
            arr = (ctypes.c_char_p * max(1, len(specs)))(*specs)
            rc = int(self._lib.xlu_disk_parse(cfg, len(specs), arr, buf))
            if rc:
                return rc
            out = light.libxl_device_disk_to_json(None, buf)
            try:
                return dict(json.loads(ctypes.string_at(out).decode()))
            finally:
                self._libc.free(out)
        finally:
            light.libxl_device_disk_dispose(buf)
            self._lib.xlu_cfg_destroy(cfg)

    def read(self, data: bytes, keys: set[str]) -> tuple[int, dict[str, LibValue]]:
        """libxl's return code for `data` and the value of each of `keys` it holds.

        Never pass a NUL byte inside a quoted string: libxl aborts (an assert in
        ``xlu__cfgl_dequote``)."""
        lib = self._lib
        cfg = lib.xlu_cfg_init(self._report, b"differential")
        try:
            rc = lib.xlu_cfg_readdata(cfg, data, len(data))
            out: dict[str, LibValue] = {}
            for key in keys:
                k = key.encode()
                s = ctypes.c_char_p()
                if lib.xlu_cfg_get_string(cfg, k, ctypes.byref(s), 1) == 0:
                    out[key] = s.value or b""
                    continue
                lst, n = ctypes.c_void_p(), ctypes.c_int()
                if lib.xlu_cfg_get_list(cfg, k, ctypes.byref(lst), ctypes.byref(n), 1) == 0:
                    out[key] = [lib.xlu_cfg_get_listitem(lst, i) for i in range(n.value)]
            return rc, out
        finally:
            lib.xlu_cfg_destroy(cfg)


def load() -> LibXlUtil | None:
    return LibXlUtil(_PATHS[0]) if _PATHS else None


def load_with_disks() -> LibXlUtil | None:
    """libxlutil with libxenlight beside it (for ``disk``), or None."""
    return LibXlUtil(_PATHS[0]) if _PATHS and _LIGHT_PATHS else None
