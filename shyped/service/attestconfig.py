"""The ``[attestation]`` table of ``shyped.toml`` (docs/attestation.md): off by default."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import attrs

KEYS: Final = (
    "enabled", "tcti", "pcr", "ak_handle", "log", "ak_public", "ak_auth", "max_log_bytes",
    "quotes_per_minute", "quote_burst",
)  # fmt: skip
#: PCRs shyped may extend: the OS range. 0-7 are the firmware's; 16 (debug) and 23
#: (application) can be reset by any software at locality 0, which would let dom0 root
#: erase the measurements.
ALLOWED_PCRS: Final = tuple(range(8, 16))
DEFAULT_PCR: Final = 13
#: A persistent handle in the owner range (TPM 2.0 Part 2, 7.5: 0x81000000-0x817FFFFF).
DEFAULT_AK_HANDLE: Final = 0x8101A770
_PERSISTENT: Final = (0x81000000, 0x817FFFFF)


@attrs.frozen
class AttestationConfig:
    enabled: bool = False
    #: where tpm2-tools reach the TPM: the kernel's resource manager on a real dom0
    tcti: str = "device:/dev/tpmrm0"
    pcr: int = DEFAULT_PCR
    ak_handle: int = DEFAULT_AK_HANDLE
    log: Path = Path("/var/lib/shyped/attest/measurements.jsonl")
    ak_public: Path = Path("/var/lib/shyped/attest/ak.pem")
    #: the AK's auth value (root only, 0600): without it, tss members may not quote with it
    ak_auth: Path = Path("/var/lib/shyped/attest/ak.auth")
    max_log_bytes: int = 16 << 20  #: the bundle carries the log: under the 64 MiB answer cap
    #: quotes one uid outside root and the admin group may ask for: `quote_burst` at once,
    #: then `quotes_per_minute` (a token bucket per uid); beyond, ``busy`` (rate-limited)
    quotes_per_minute: int = 6
    quote_burst: int = 3


def parse_attestation(c: Any) -> AttestationConfig:
    """Read ``[attestation]`` through the config checker `c` (`shyped.service.config`)."""
    t = c.table(c.doc, "attestation")
    c.known(t, "attestation")
    d = AttestationConfig()
    pcr = c.get(t, "attestation", "pcr", int, d.pcr)
    if pcr not in ALLOWED_PCRS:
        c.bad(
            f"attestation.pcr must be one of {ALLOWED_PCRS[0]}..{ALLOWED_PCRS[-1]} (the OS "
            f"range; 16 and 23 can be reset by anyone), not {pcr!r}",
            "attestation",
            "pcr",
        )
        pcr = d.pcr
    handle_text = c.get(t, "attestation", "ak_handle", str, None)
    handle = d.ak_handle
    if handle_text is not None:
        try:
            handle = int(handle_text, 16)
        except ValueError:
            handle = -1
        if not _PERSISTENT[0] <= handle <= _PERSISTENT[1]:
            c.bad(
                "attestation.ak_handle must be a persistent owner handle 0x81000000.."
                f"0x817FFFFF, not {handle_text!r}",
                "attestation",
                "ak_handle",
            )
            handle = d.ak_handle
    tcti = c.get(t, "attestation", "tcti", str, d.tcti)
    if not tcti.strip() or "\x00" in tcti or "\n" in tcti:
        c.bad(f"attestation.tcti must name a TCTI, not {tcti!r}", "attestation", "tcti")
        tcti = d.tcti
    return AttestationConfig(
        enabled=c.get(t, "attestation", "enabled", bool, d.enabled),
        tcti=tcti,
        pcr=pcr,
        ak_handle=handle,
        log=c.path(t, "attestation", "log", str(d.log)) or d.log,
        ak_public=c.path(t, "attestation", "ak_public", str(d.ak_public)) or d.ak_public,
        ak_auth=c.path(t, "attestation", "ak_auth", str(d.ak_auth)) or d.ak_auth,
        max_log_bytes=c.number(
            t, "attestation", "max_log_bytes", int, d.max_log_bytes, 4096, 1 << 30
        ),
        quotes_per_minute=c.number(
            t, "attestation", "quotes_per_minute", int, d.quotes_per_minute, 1, 600
        ),
        quote_burst=c.number(t, "attestation", "quote_burst", int, d.quote_burst, 1, 64),
    )
