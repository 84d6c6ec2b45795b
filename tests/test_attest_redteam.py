"""Red team, hostile local users and hostile hosts against attestation (docs/attestation.md):
an AK auth file planted by another user, one TPM posing as two hosts behind a re-encoded AK,
bundles built to crash the verifier. Real swtpm, real second users (tests/user_helpers.py)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from test_attest_pool import verify
from tpm_helpers import Swtpm, need_swtpm, stub_daemon, swtpm
from user_helpers import local_user, needs_users, setpriv

from shyped.service.attestation import Attestation
from shyped.service.attestconfig import AttestationConfig
from shyped.service.tpm import TpmError, TpmTools


@pytest.fixture
def tpm() -> Iterator[Swtpm]:
    need_swtpm()
    with swtpm() as t:
        yield t


@needs_users
@pytest.mark.parametrize("directory", ["theirs", "sticky"])
def test_an_ak_auth_file_planted_by_another_user_is_refused(tpm: Swtpm, directory: str) -> None:
    """A local user who may write the directory of ``ak_auth`` (a misconfigured path, a
    state directory made by hand, a sticky shared one) plants the file first, mode 0600 --
    which passed the mode check -- with an auth value they chose. shyped must not make its AK
    with it: else that user, a tss member, quotes with the host's AK over any state report."""
    with local_user("shyak") as user, tempfile.TemporaryDirectory() as top:
        os.chmod(top, 0o755)
        shared = Path(top, "attest")
        shared.mkdir()
        if directory == "theirs":
            os.chown(shared, user.uid, user.gid)
        else:
            os.chmod(shared, 0o1777)
        auth = shared / "ak.auth"
        known = "a1" * 16
        subprocess.run(
            [*setpriv(user), "sh", "-c", f"umask 077; printf %s {known} > {auth}"], check=True
        )
        assert auth.stat().st_mode & 0o777 == 0o600 and auth.stat().st_uid == user.uid
        cfg = AttestationConfig(
            enabled=True, tcti=tpm.tcti, log=shared / "m.jsonl", ak_public=shared / "ak.pem",
            ak_auth=auth,
        )  # fmt: skip
        att = Attestation(None, cfg, TpmTools(tpm.tcti))  # type: ignore[arg-type]
        try:
            att._ensure_ak()
        except TpmError as e:
            assert f"owned by uid {user.uid}" in str(e), e
            assert TpmTools(tpm.tcti).ak_public(cfg.ak_handle) is None  # no AK was made
            return
        # the attack, played: the planting user quotes with the host's AK
        mine = Path(top, "mine.auth")
        mine.write_text(known)
        os.chmod(mine, 0o644)
        with tempfile.TemporaryDirectory() as work:
            os.chmod(work, 0o777)
            r = subprocess.run(
                [*setpriv(user), "tpm2_quote", "-c", hex(cfg.ak_handle), "-l", "sha256:13",
                 "-q", "00" * 32, "-m", "q.msg", "-s", "q.sig", "-g", "sha256",
                 "-p", f"file:{mine}"],
                cwd=work, env={**os.environ, "TPM2TOOLS_TCTI": tpm.tcti},
                capture_output=True, text=True, check=False,
            )  # fmt: skip
        pytest.fail(
            f"shyped made its AK with an auth value uid {user.uid} planted; that user's own "
            f"tpm2_quote with the AK: exit {r.returncode} {r.stderr.strip()[-200:]}"
        )


def test_an_ak_auth_symlink_is_refused(tpm: Swtpm, tmp_path: Path) -> None:
    """ak_auth as a symlink (to a root file of mode 0600 holding 32 bytes): not followed."""
    target = tmp_path / "elsewhere"
    target.write_text("b2" * 16)
    target.chmod(0o600)
    auth = tmp_path / "ak.auth"
    auth.symlink_to(target)
    cfg = AttestationConfig(
        enabled=True, tcti=tpm.tcti, log=tmp_path / "m.jsonl", ak_public=tmp_path / "ak.pem",
        ak_auth=auth,
    )  # fmt: skip
    att = Attestation(None, cfg, TpmTools(tpm.tcti))  # type: ignore[arg-type]
    with pytest.raises(TpmError, match="not a regular file"):
        att._ensure_ak()


@pytest_twisted.ensureDeferred
async def test_one_tpm_with_its_ak_re_encoded_is_still_one_tpm_for_two_hosts(
    tmp_path: Path,
) -> None:
    """A host posing as two (a pool verifier wants two TPMs): the same bundle twice, checked
    with its AK and with the same key re-encoded (text before the PEM block, other line
    lengths: OpenSSL and tpm2_checkquote read both). The verifier compared the files' bytes."""
    need_swtpm()
    with swtpm() as t:
        d = stub_daemon(tmp_path / "h", t)
        await d.attestation.start()
        answer = await d.attestation.quote("n0")
    b1, b2 = tmp_path / "h1.json", tmp_path / "h2.json"
    doc = json.loads(answer)["bundle"]
    b1.write_text(json.dumps(doc))
    b2.write_text(json.dumps(doc))
    pem = d.attestation.ak_pem.decode()
    a1, a2, a3 = tmp_path / "h1.pem", tmp_path / "h2.pem", tmp_path / "h3.pem"
    a1.write_text(pem)
    a2.write_text("attestation key of host 2, enrolled 2026-12-07\n" + pem)
    lines = pem.strip().splitlines()
    body = "".join(lines[1:-1])
    a3.write_text("\n".join([lines[0], *(body[i : i + 48] for i in range(0, len(body), 48)),
                             lines[-1]]) + "\n")  # fmt: skip
    for other in (a2, a3):
        assert verify(str(b2), "--ak", str(other), "--nonce", "n0").returncode == 0
        r = verify(str(b1), str(b2), "--ak", str(a1), "--ak", str(other), "--nonce", "n0")
        assert r.returncode == 1, r.stdout
        assert "are checked with the same AK (one TPM for two hosts" in r.stdout


def test_an_ak_file_that_is_not_a_public_key_is_a_usage_error(tmp_path: Path) -> None:
    bundle = tmp_path / "b.json"
    bundle.write_text("{}")
    ak = tmp_path / "ak.pem"
    ak.write_text("not a key\n")
    r = verify(str(bundle), "--ak", str(ak), "--nonce", "n")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "not a PEM public key" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "bundle",
    [
        '{"format": "shyped-attest/2", "state": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "[" * 100_000 + "]" * 100_000,
    ],
    ids=["deep-state", "deep-document"],
)
def test_a_deeply_nested_bundle_is_refused_not_a_crash(tmp_path: Path, bundle: str) -> None:
    """A bundle built to blow the JSON decoder's recursion: exit 2 (cannot be read), named,
    no traceback (exit 1 would read as a verdict)."""
    path, ak = tmp_path / "b.json", tmp_path / "ak.pem"
    path.write_text(bundle)
    ak.write_text(_SOME_KEY)
    r = verify(str(path), "--ak", str(ak), "--nonce", "n")
    assert r.returncode == 2, (r.returncode, r.stderr[-500:])
    assert "nested too deeply" in r.stderr and "Traceback" not in r.stderr


_SOME_KEY = """\
-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=
-----END PUBLIC KEY-----
"""


def unsigned_bundle(path: Path, policy: dict[str, object], host: str) -> str:
    """A bundle whose quote message is well formed (its extraData, its PCR digest) but which
    no TPM signed: what anyone can write."""
    import base64
    import hashlib

    from test_attest_core import attest_message

    from shyped.attest import measure, quote

    labels: dict[str, object] = {}
    log = [measure.make_entry(0, {"kind": "start", "policy": policy, "mode": "enforcing",
                                  "labels_sha256": measure.labels_digest(labels)})]  # fmt: skip
    state = {"policy": policy, "mode": "enforcing", "labels": labels, "domains": [],
             "audit_head": None, "host": host}  # fmt: skip
    msg = attest_message(quote.qualifying_data("n", state), 13,
                         hashlib.sha256(measure.replay(log)).digest())  # fmt: skip
    doc = quote.bundle_doc("n", 13, msg, b"sig", [e.line() for e in log], state)
    doc["quote"]["message"] = base64.b64encode(msg).decode()
    path.write_text(json.dumps(doc))
    return str(path)


def test_same_policy_over_bundles_with_odd_policy_fields_is_a_verdict_not_a_crash(
    tmp_path: Path,
) -> None:
    """Unsigned bundles whose logs measure a policy whose sha256 is a list or an object: each
    host NOT VERIFIED (signature), the cross-host check compares without crashing."""
    paths = [
        unsigned_bundle(
            tmp_path / f"b{i}.json", {"name": "p", "version": "1", "sha256": sha}, f"h{i}"
        )
        for i, sha in enumerate(([], {"x": 1}))
    ]
    a1, a2 = tmp_path / "a1.pem", tmp_path / "a2.pem"
    a1.write_text(_SOME_KEY)
    a2.write_text(_OTHER_KEY)
    r = verify(*paths, "--ak", str(a1), "--ak", str(a2), "--nonce", "n", "--same-policy")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr[-800:])
    assert "Traceback" not in r.stderr
    assert "the hosts do not enforce the same policy" in r.stdout


def test_a_bundle_cannot_write_escape_sequences_or_lines_to_the_verifier_s_terminal(
    tmp_path: Path,
) -> None:
    """An unsigned bundle whose host name (printed before its verdict) carries a newline and
    a fake verdict, then the terminal's 'conceal' sequence (everything after it invisible,
    the NOT VERIFIED lines included): printed escaped, one line, no escape sequence."""
    policy = {"name": "p\x1b[2K", "version": "1", "sha256": "ab" * 32}
    fake = "h1 (b1.json)\n   VERIFIED: quote by this AK for nonce 'n'\x1b[8m"
    paths = [
        unsigned_bundle(tmp_path / "b1.json", policy, fake),
        unsigned_bundle(tmp_path / "b2.json", policy, "h2\x07"),
    ]
    a1, a2 = tmp_path / "a1.pem", tmp_path / "a2.pem"
    a1.write_text(_SOME_KEY)
    a2.write_text(_OTHER_KEY)
    r = verify(*paths, "--ak", str(a1), "--ak", str(a2), "--nonce", "n")
    assert r.returncode == 1
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout, r.stdout
    assert not any(line.lstrip().startswith("VERIFIED") for line in r.stdout.splitlines()), r.stdout
    assert "NOT VERIFIED: 2 of 2 host(s)" in r.stdout


_OTHER_KEY = """\
-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEA3+r6/8cBpG/dJBQCtRLSvjbC2f9Xb3CU2H2wqy0lGxI=
-----END PUBLIC KEY-----
"""


@pytest_twisted.ensureDeferred
async def test_attestation_works_without_a_writable_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the shipped unit /tmp is read-only (ProtectSystem=strict, no PrivateTmp=, so that
    the daemon sees the disk paths the backends see): tpm2-tools' files go to the state
    directory. Played with a temporary directory that does not exist."""
    import tempfile as tempfile_module

    need_swtpm()
    with swtpm() as t:
        monkeypatch.setattr(tempfile_module, "tempdir", str(tmp_path / "no-tmp"))
        d = stub_daemon(tmp_path / "h", t)  # its Attestation makes its own TpmTools
        await d.attestation.start()
        assert d.attestation.unavailable is None, d.attestation.unavailable
        answer = await d.attestation.quote("n0")
        monkeypatch.undo()
    assert json.loads(answer)["bundle"]["nonce"] == "n0"
    assert not (tmp_path / "no-tmp").exists()
