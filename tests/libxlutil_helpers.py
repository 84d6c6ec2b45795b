"""Debian's real libxlutil (xen-utils-4.17 / libxenmisc4.17) through ctypes, to read an xl.cfg
exactly as ``xl create`` does. Signatures from tools/include/libxlutil.h (Xen 4.17)."""

from __future__ import annotations

import ctypes
import glob
from typing import Any

_PATHS = sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libxlutil.so.4.17*"))

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
