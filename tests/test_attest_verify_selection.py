"""Red team: a bundle whose quote message selects PCRs without end. A TPMS_ATTEST's PCR
selection is a count (32 bits) of (hash, size, bitmap) entries, each bitmap up to 255 bytes;
the verifier expanded every set bit into an (alg, index) pair. The message is one base64
string, a single JSON value for `check_value_count`: 258 bytes gave 2,040 pairs, so the 64 MiB
cap on a bundle let a file anyone may write take ~40 GB in ``shypectl attest verify`` (a
256 KB message: 2 million pairs, 230 MiB). The parser now refuses a selection longer than a
TPM makes (`shyped.attest.quote.MAX_PCR_BANKS` banks of `MAX_PCR_SELECT` bytes), before it
expands it. The child runs under an address-space limit, so the old parser fails fast
(MemoryError) instead of taking the machine."""

from __future__ import annotations

import base64
import json
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_attest_redteam import _SOME_KEY

from shyped.attest.quote import BundleError, parse_attest

_SELECT_ALL = struct.pack(">HB", 0x000B, 255) + b"\xff" * 255


def selecting(n: int, select: bytes = _SELECT_ALL) -> bytes:
    """A TPMS_ATTEST of a quote whose PCR selection is `n` copies of `select`."""
    return (
        struct.pack(">IH", 0xFF544347, 0x8018)
        + struct.pack(">H", 0) + struct.pack(">H", 0)
        + struct.pack(">QIIB", 1, 2, 3, 1) + struct.pack(">Q", 7)
        + struct.pack(">I", n) + select * n
        + struct.pack(">H", 32) + bytes(32)
    )  # fmt: skip


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_a_quote_selecting_pcrs_without_end_is_refused_not_expanded(tmp_path: Path) -> None:
    message = selecting(40_000)  # ~10 MiB: 80 million pairs, ~8 GB expanded
    path, ak = tmp_path / "b.json", tmp_path / "ak.pem"
    doc = {
        "format": "shyped-attest/2", "nonce": "n", "pcr": 13, "log": [], "state": {},
        "quote": {"message": base64.b64encode(message).decode(), "signature": ""},
    }  # fmt: skip
    path.write_text(json.dumps(doc))
    ak.write_text(_SOME_KEY)
    r = subprocess.run(
        [sys.executable, "-m", "shyped.cli.shypectl", "attest", "verify", str(path),
         "--ak", str(ak), "--nonce", "n"],
        capture_output=True, text=True, check=False, timeout=300, preexec_fn=_limit_memory,
    )  # fmt: skip
    assert "Traceback" not in r.stderr and "MemoryError" not in r.stderr, r.stderr[-800:]
    out = r.stdout + r.stderr
    assert r.returncode in (1, 2), (r.returncode, out[-800:])
    assert "NOT VERIFIED" in out or "not a quote bundle" in out, out[-800:]
    assert "PCR selection" in out, out[-800:]


def test_a_tpm_s_selection_still_parses() -> None:
    one = struct.pack(">HB", 0x000B, 3) + b"\x00\x20\x00"  # sha256, PCR 13
    assert parse_attest(selecting(1, one)).pcrs == ((0x000B, 13),)
    with pytest.raises(BundleError, match="PCR selection"):
        parse_attest(selecting(1, _SELECT_ALL))
    with pytest.raises(BundleError, match="PCR selection"):
        parse_attest(selecting(1_000, one))


def test_a_log_of_wrong_entries_is_named_up_to_a_bound_then_counted() -> None:
    """A forged log of 700,000 wrong entries made a verdict of 700,000 lines (~170 MB kept):
    the first `MAX_LOG_PROBLEMS` are named, the rest counted."""
    from shyped.attest.measure import MAX_LOG_PROBLEMS, Entry, LogFold

    fold = LogFold()
    for _ in range(MAX_LOG_PROBLEMS + 50):
        fold.feed(Entry(7, {"v": 1}, bytes(32)))  # another format: one problem each
    problems = fold.problems
    assert len(problems) == MAX_LOG_PROBLEMS + 1
    assert problems[0].startswith("log entry 0: unknown measurement format 1")
    assert problems[-1] == "... and 50 more problems of log entries"
