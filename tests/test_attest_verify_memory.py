"""Red team: a hostile host (or anyone who hands the verifier a file) writes a bundle of tiny
JSON values up to the verifier's 64 MiB cap. Parsed, each 2-byte ``{}`` is a 64-byte dict: the
verify child took ~1.7 GB before it said anything. The verifier counts the values before it
parses (`shyped.attest.quote.check_value_count`) and refuses past the bound, exit 2, naming
it; the peak RSS of the child is measured (``os.wait4``), not guessed."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_attest_redteam import _SOME_KEY

from shyped.attest.quote import MAX_BUNDLE_VALUES, count_values
from shyped.cli.shypectl_attest import MAX_BUNDLE_BYTES

_HEAD = '{"format":"shyped-attest/2","nonce":"n","pcr":13,"quote":{"message":"","signature":""},'


def write_hostile(path: Path, kind: str) -> None:
    """A bundle of about `MAX_BUNDLE_BYTES` whose values are as small as JSON allows."""
    room = MAX_BUNDLE_BYTES - 200
    with path.open("w") as f:
        if kind == "tiny-objects":  # the finding: a list of {} in the state report
            f.write(_HEAD + '"log":[],"state":{"domains":[' + "{}," * (room // 3) + "{}]}}")
        elif kind == "short-keys":  # one object of distinct 4-letter keys (each a new str)
            f.write(_HEAD + '"log":[],"state":{"labels":{"":0')
            keys = itertools.product(_L, repeat=4)
            for _ in range(room // 9 // 4096):
                f.write("".join(f',"{"".join(k)}":0' for k in itertools.islice(keys, 4096)))
            f.write("}}}")
        elif kind == "packed-log-lines":  # values hidden in log lines (strings when counted)
            entry = {"seq": 0, "digest": "00" * 32, "event": {"a": [{}] * 300}}
            line = json.dumps(json.dumps(entry, separators=(",", ":")))
            n = room // (len(line) + 1)
            f.write(_HEAD + '"state":{},"log":[' + (line + ",") * (n - 1) + line + "]}")
        else:  # log lines of minimal entries, each parsed into an entry by the verifier
            entry = {"seq": 0, "digest": "00" * 32, "event": {}}
            line = json.dumps(json.dumps(entry, separators=(",", ":")))
            n = room // (len(line) + 1)
            f.write(_HEAD + '"state":{},"log":[' + (line + ",") * (n - 1) + line + "]}")


_L = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def peak_rss_verify(bundle: Path, ak: Path) -> tuple[int, int, str]:
    """(exit status, peak RSS in bytes, stderr) of ``shypectl attest verify`` in a child."""
    child = subprocess.Popen(
        [sys.executable, "-m", "shyped.cli.shypectl", "attest", "verify", str(bundle),
         "--ak", str(ak), "--nonce", "n"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert child.stderr is not None
    err = child.stderr.read().decode(errors="replace")  # before wait4: a full pipe blocks it
    _pid, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, usage.ru_maxrss * 1024, err


@pytest.mark.parametrize("kind", ["tiny-objects", "short-keys", "log-lines", "packed-log-lines"])
def test_a_bundle_of_tiny_values_does_not_take_the_verifier_s_memory(
    tmp_path: Path, kind: str
) -> None:
    path, ak = tmp_path / "b.json", tmp_path / "ak.pem"
    write_hostile(path, kind)
    assert path.stat().st_size <= MAX_BUNDLE_BYTES
    ak.write_text(_SOME_KEY)
    code, peak, err = peak_rss_verify(path, ak)
    size = path.stat().st_size
    # the raw bytes are read whole (bounded by MAX_BUNDLE_BYTES); what is built from them is
    # bounded by MAX_BUNDLE_VALUES: a few times the bundle's size, not 25 times
    assert peak < 6 * size, f"{kind}: peak RSS {peak >> 20} MiB for a {size >> 20} MiB bundle"
    assert "Traceback" not in err, err[-1000:]
    if kind.endswith("log-lines"):  # under the bound: parsed line by line, a verdict
        assert code == 1, (code, err[-500:])
    else:
        assert code == 2, (code, err[-500:])
        assert f"more than {MAX_BUNDLE_VALUES} JSON values" in err and "refused before" in err


def test_value_count_bounds_json_and_ignores_what_strings_hold() -> None:
    doc = {"a": [1, 2, {"b": None}], "c": 'x,y:{[\\"', "": []}
    # values: the object, 3 keys, a list, 1, 2, an object, its key, None, the string, a list;
    # plus 1 for the empty list (its "[" counts as a first element): an upper bound
    assert count_values(json.dumps(doc).encode(), 100) == 13
    assert count_values(json.dumps({"a": [1, {"b": "c"}]}).encode(), 100) == 7  # exact
    assert count_values(b"[" + b",".join([b"{}"] * 50) + b"]", 10) == 11  # stops past it


def test_a_bundle_of_unclosed_escaped_quotes_does_not_hang_the_count(tmp_path: Path) -> None:
    """``"\\"\\"\\"...`` never closes its string: a string pattern that must end on a quote
    failed at each of them after scanning to the end, quadratic (20 KB took 18 s; this 256 KB
    bundle ~50 minutes). It terminates now with exit 2 (not JSON); the timeout is a hang
    detector far above the milliseconds it takes, not a timing assertion."""
    path, ak = tmp_path / "b.json", tmp_path / "ak.pem"
    path.write_text('{"format":"shyped-attest/2","log":["' + '\\"' * (128 << 10))
    ak.write_text(_SOME_KEY)
    r = subprocess.run(
        [sys.executable, "-m", "shyped.cli.shypectl", "attest", "verify", str(path),
         "--ak", str(ak), "--nonce", "n"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "not a quote bundle" in r.stderr, (r.returncode, r.stderr)
