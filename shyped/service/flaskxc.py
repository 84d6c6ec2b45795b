"""The xc/xl boundary to Xen's FLASK (edge, blocking: called in worker threads only).

`XenFlaskBoundary` is all shyped asks of Xen's FLASK; `XcBoundary` implements it on a dom0:

- ``libxenctrl.so.4.17`` through ctypes for the calls no ``xl`` command makes or makes well:
  ``xc_flask_getenforce`` (detection: ``ENOSYS`` means no XSM/FLASK, as on Debian's Xen),
  ``xc_flask_load`` (the binary policy, from memory: no temporary file),
  ``xc_flask_context_to_sid`` + ``xc_flask_relabel_domain`` (no ``xl`` command relabels a
  domain) and ``xc_readconsolering`` incremental with an index (``xl dmesg`` can only print the
  whole ring or clear it, which would take it from the operator);
- ``xl list -Z`` for each domain's context (``xc_domain_getinfolist`` would need the layout of
  ``xen_domctl_getdomaininfo`` in ctypes; ``xl`` prints ``libxl_flask_sid_to_context``).

Every answer is untrusted text with bounds: ``xl`` output is cut at `MAX_XL_OUTPUT`, a console
read at `CONSOLE_READ_MAX` per poll; parsing is `shyped.core.xenflask`'s (pure).
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import threading
from collections.abc import Sequence
from typing import Any, Final, Protocol

from shyped.core.xenflask import FlaskMode, ring_gap

#: The library (Debian 12's Xen 4.17 tools).
LIBXENCTRL: Final = "libxenctrl.so.4.17"
#: Where a dom0 has the privcmd device (without it this is no Xen dom0: FLASK absent).
PRIVCMD: Final = ("/dev/xen/privcmd", "/proc/xen/privcmd")
#: Bytes of ``xl`` output read.
MAX_XL_OUTPUT: Final = 1 << 20
#: Console ring bytes read per call, and per poll at most.
CONSOLE_CHUNK: Final = 16384
CONSOLE_READ_MAX: Final = 256 * 1024
#: Bound on an ``xl`` run.
XL_TIMEOUT_S: Final = 30.0


class FlaskError(Exception):
    """Xen or its tools refused or failed (the message says what and why)."""


class XenFlaskBoundary(Protocol):
    """What shyped asks of Xen's FLASK. Blocking: the daemon calls it in a worker thread."""

    def detect(self) -> tuple[FlaskMode, str]:
        """FLASK's mode, and why it is absent when it is."""
        ...

    def load_policy(self, binary: bytes) -> None:
        """Load a binary policy; `FlaskError` if Xen refuses it (then the old one stays)."""
        ...

    def relabel(self, domid: int, context: str) -> None:
        """Relabel domain `domid` to `context`; `FlaskError` if Xen refuses."""
        ...

    def list_contexts(self) -> str:
        """``xl list -Z``'s output (parsed by `shyped.core.xenflask.parse_list_z`)."""
        ...

    def read_console(self, index: int) -> tuple[str, int, bool]:
        """Xen's console ring from `index` on (bounded), the index to read from next, and
        whether the ring had overwritten `index` (the text then starts in mid-line)."""
        ...


class _Absent(Exception):
    pass


class XcBoundary:
    """`XenFlaskBoundary` over libxenctrl (ctypes) and ``xl`` (one lock: one call at a time)."""

    def __init__(self, xl: Sequence[str] = ("xl",), library: str = LIBXENCTRL) -> None:
        self.xl = tuple(xl)
        self.library = library
        self._lock = threading.Lock()
        self._lib: Any = None
        self._xch: Any = None

    def _open(self) -> tuple[Any, Any]:
        if self._xch is not None:
            return self._lib, self._xch
        if not any(os.path.exists(p) for p in PRIVCMD):
            raise _Absent(f"no {' or '.join(PRIVCMD)}: not a Xen dom0")
        try:
            lib = ctypes.CDLL(self.library, use_errno=True)
        except OSError as e:
            raise _Absent(f"cannot load {self.library}: {e}") from None
        u32, p = ctypes.c_uint32, ctypes.c_void_p
        lib.xc_interface_open.argtypes = [p, p, ctypes.c_uint]
        lib.xc_interface_open.restype = p
        lib.xc_flask_getenforce.argtypes = [p]
        lib.xc_flask_load.argtypes = [p, ctypes.c_char_p, u32]
        lib.xc_flask_context_to_sid.argtypes = [p, ctypes.c_char_p, u32, ctypes.POINTER(u32)]
        lib.xc_flask_relabel_domain.argtypes = [p, u32, u32]
        lib.xc_readconsolering.argtypes = [
            p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint), ctypes.c_int, ctypes.c_int,
            ctypes.POINTER(u32),
        ]  # fmt: skip
        xch = lib.xc_interface_open(None, None, 0)
        if not xch:
            raise _Absent(f"xc_interface_open failed: {os.strerror(ctypes.get_errno())}")
        self._lib, self._xch = lib, xch
        return lib, xch

    @staticmethod
    def _failed(call: str) -> FlaskError:
        code = ctypes.get_errno()
        return FlaskError(f"{call}: {errno.errorcode.get(code, code)} ({os.strerror(code)})")

    def detect(self) -> tuple[FlaskMode, str]:
        with self._lock:
            try:
                lib, xch = self._open()
            except _Absent as e:
                return FlaskMode.ABSENT, str(e)
            rc = lib.xc_flask_getenforce(xch)
            if rc < 0:
                code = ctypes.get_errno()
                if code in (errno.ENOSYS, errno.EOPNOTSUPP):
                    return (
                        FlaskMode.ABSENT,
                        "this Xen has no XSM/FLASK (xc_flask_getenforce: ENOSYS)",
                    )
                raise self._failed("xc_flask_getenforce")
            return (FlaskMode.ENFORCING if rc == 1 else FlaskMode.PERMISSIVE), ""

    def load_policy(self, binary: bytes) -> None:
        with self._lock:
            lib, xch = self._need()
            buf = ctypes.create_string_buffer(binary, len(binary))
            if lib.xc_flask_load(xch, buf, len(binary)) < 0:
                raise self._failed("xc_flask_load")

    def relabel(self, domid: int, context: str) -> None:
        data = context.encode("ascii")
        with self._lock:
            lib, xch = self._need()
            sid = ctypes.c_uint32(0)
            buf = ctypes.create_string_buffer(data, len(data) + 1)
            if lib.xc_flask_context_to_sid(xch, buf, len(data), ctypes.byref(sid)) < 0:
                raise self._failed(f"xc_flask_context_to_sid({context})")
            if lib.xc_flask_relabel_domain(xch, int(domid), sid.value) < 0:
                raise self._failed(f"xc_flask_relabel_domain({domid}, {context})")

    def read_console(self, index: int) -> tuple[str, int, bool]:
        out = bytearray()
        gap = False
        with self._lock:
            lib, xch = self._need()
            idx = ctypes.c_uint32(index)
            buf = ctypes.create_string_buffer(CONSOLE_CHUNK)
            while len(out) < CONSOLE_READ_MAX:
                n = ctypes.c_uint(CONSOLE_CHUNK)
                requested = idx.value
                if lib.xc_readconsolering(xch, buf, ctypes.byref(n), 0, 1, ctypes.byref(idx)) < 0:
                    raise self._failed("xc_readconsolering")
                count = min(n.value, CONSOLE_CHUNK)
                if ring_gap(requested, idx.value, count):
                    if out:  # overwritten since the last chunk: the next poll starts there
                        idx.value = requested
                        break
                    gap = True
                out += buf.raw[:count]
                if count < CONSOLE_CHUNK:
                    break
            return out.decode("utf-8", "replace"), idx.value, gap

    def list_contexts(self) -> str:
        argv = [*self.xl, "list", "-Z"]
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=XL_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FlaskError(f"{' '.join(argv)}: {e}") from None
        if proc.returncode != 0:
            tail = proc.stderr[-500:].decode("utf-8", "replace").strip()
            raise FlaskError(f"{' '.join(argv)} failed (exit {proc.returncode}): {tail}")
        return proc.stdout[:MAX_XL_OUTPUT].decode("utf-8", "replace")

    def _need(self) -> tuple[Any, Any]:
        try:
            return self._open()
        except _Absent as e:
            raise FlaskError(str(e)) from None


class DisabledBoundary:
    """No FLASK calls at all (``[flask] enabled = false``): detection says absent."""

    def detect(self) -> tuple[FlaskMode, str]:
        return FlaskMode.ABSENT, "disabled in shyped.toml ([flask] enabled = false)"

    def load_policy(self, binary: bytes) -> None:
        raise FlaskError("FLASK is disabled")

    def relabel(self, domid: int, context: str) -> None:
        raise FlaskError("FLASK is disabled")

    def list_contexts(self) -> str:
        raise FlaskError("FLASK is disabled")

    def read_console(self, index: int) -> tuple[str, int, bool]:
        raise FlaskError("FLASK is disabled")
