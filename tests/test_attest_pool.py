"""A pool's attestation: each host attests itself (its own TPM, AK, log), a verifier checks
all bundles in one ``shypectl attest verify`` (docs/attestation.md, *Pool mode*). Two real
swtpm instances stand for two hosts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest_twisted
from tpm_helpers import need_swtpm, stub_daemon, swtpm


def verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shyped.cli.shypectl", "attest", "verify", *args],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_one_verify_checks_every_host_s_bundle_with_its_own_ak(tmp_path: Path) -> None:
    need_swtpm()
    files: list[tuple[Path, Path]] = []
    with swtpm() as t1, swtpm() as t2:
        for i, (tpm, sha) in enumerate(((t1, "ab" * 32), (t2, "cd" * 32))):
            d = stub_daemon(tmp_path / f"h{i}", tpm, sha)
            await d.attestation.start()
            answer = await d.attestation.quote(f"n{i}")
            bundle, ak = tmp_path / f"h{i}.json", tmp_path / f"h{i}.pem"
            bundle.write_text(json.dumps(json.loads(answer)["bundle"]))
            ak.write_bytes(d.attestation.ak_pem)
            files.append((bundle, ak))
    (b1, a1), (b2, a2) = files
    assert a1.read_bytes() != a2.read_bytes()  # two TPMs, two AKs

    both = [str(b1), str(b2), "--ak", str(a1), "--ak", str(a2), "--nonce", "n0", "--nonce"]
    r = verify(*both, "n1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("   VERIFIED: quote by this AK") == 2
    assert r.stdout.rstrip().endswith("VERIFIED: all 2 hosts")
    doc = json.loads(verify("--json", *both, "n1").stdout)
    assert doc["verified"] and doc["problems"] == []
    assert [h["policy"]["sha256"] for h in doc["hosts"]] == ["ab" * 32, "cd" * 32]

    # the hosts enforce different policies: named when the verifier requires one
    r = verify(*both, "n1", "--same-policy")
    assert r.returncode == 1
    assert "across hosts: policy: the hosts do not enforce the same policy" in r.stdout

    # each bundle checked with the other host's AK: both fail, each naming the signature
    r = verify(str(b1), str(b2), "--ak", str(a2), "--ak", str(a1), "--nonce", "n0", "--nonce", "n1")
    assert r.returncode == 1 and r.stdout.count("signature: the quote does not verify") == 2
    assert "NOT VERIFIED: 2 of 2 host(s)" in r.stdout

    # one TPM presented as two hosts (its bundle twice, its AK twice)
    r = verify(str(b1), str(b1), "--ak", str(a1), "--ak", str(a1), "--nonce", "n0")
    assert r.returncode == 1 and "are checked with the same AK (one TPM for two hosts" in r.stdout

    # a replayed bundle among fresh ones: the host whose nonce does not match is named
    r = verify(*both, "n9")
    assert r.returncode == 1 and "the quote was made for nonce 'n1', not 'n9'" in r.stdout
    assert r.stdout.count("   VERIFIED: quote by this AK") == 1

    # mismatched counts are a usage error
    r = verify(str(b1), str(b2), "--ak", str(a1), "--nonce", "n0")
    assert r.returncode == 2 and "2 bundle(s) and 1 --ak" in r.stderr
