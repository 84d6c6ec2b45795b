"""The attestation key itself (docs/attestation.md, *The attestation key*): a key at the handle
that is not a restricted signing key fixed to the TPM is refused (it would sign forged quotes),
and a TPM user's failed auth attempts cannot lock shyped's AK out (noDA). Real swtpm, a real
second user (tests/user_helpers.py) playing a ``tss`` member."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from test_attest_core import attest_message
from test_attest_pool import verify
from tpm_helpers import Swtpm, need_swtpm, stub_daemon, swtpm
from user_helpers import Account, local_user, needs_users, setpriv

from shyped.attest import akpublic
from shyped.service.attestation import Attestation, AttestationUnavailable
from shyped.service.attestconfig import AttestationConfig
from shyped.service.tpm import TpmError, TpmTools, check_signature


@pytest.fixture
def tpm() -> Iterator[Swtpm]:
    need_swtpm()
    with swtpm() as t:
        yield t


def tpm2(tpm: Swtpm, cwd: Path, *argv: str, user: Account | None = None) -> str:
    """A tpm2-tools command (as `user` if given), then the transient objects flushed (no
    resource manager on the swtpm TCTI: each context file loaded stays loaded)."""
    env = {**os.environ, "TPM2TOOLS_TCTI": tpm.tcti}
    prefix = [] if user is None else setpriv(user)
    r = subprocess.run(
        [*prefix, *argv], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    TpmTools(tpm.tcti)._flush()
    assert r.returncode == 0, (argv, r.stderr)
    return r.stdout


def auth_file(path: Path) -> Path:
    path.write_text("0123456789abcdef0123456789abcdef")
    path.chmod(0o600)
    return path


def config(tpm: Swtpm, tmp_path: Path) -> AttestationConfig:
    return AttestationConfig(
        enabled=True, tcti=tpm.tcti, log=tmp_path / "m.jsonl", ak_public=tmp_path / "ak.pem",
        ak_auth=auth_file(tmp_path / "ak.auth"),
    )  # fmt: skip


def test_a_key_at_the_handle_that_is_not_restricted_is_refused(tpm: Swtpm, tmp_path: Path) -> None:
    """A signing key that is not ``restricted`` put at the AK's handle (with the auth value
    shyped holds: it takes it, so the start-up quote passes): such a key signs any digest,
    a forged TPMS_ATTEST too, and the forgery verifies with its public key. shyped must
    refuse it at start, naming the attribute and the recovery."""
    cfg = config(tpm, tmp_path)
    work = tmp_path / "w"
    work.mkdir()
    tpm2(tpm, work, "tpm2_createprimary", "-C", "o", "-c", "prim.ctx")
    tpm2(tpm, work, "tpm2_create", "-C", "prim.ctx", "-G", "rsa2048:rsassa-sha256:null",
         "-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
         "-p", f"file:{cfg.ak_auth}", "-u", "k.pub", "-r", "k.priv")  # fmt: skip
    tpm2(tpm, work, "tpm2_load", "-C", "prim.ctx", "-u", "k.pub", "-r", "k.priv", "-c", "k.ctx")
    tpm2(tpm, work, "tpm2_evictcontrol", "-C", "o", "-c", "k.ctx", hex(cfg.ak_handle))

    # why it matters: a quote message no TPM made (any extraData, any PCR digest), signed
    forged_extra = hashlib.sha256(b"any state report").digest()
    msg = attest_message(forged_extra, 13, hashlib.sha256(b"any pcr").digest())
    (work / "forged.msg").write_bytes(msg)
    tpm2(tpm, work, "tpm2_sign", "-c", hex(cfg.ak_handle), "-g", "sha256", "-s", "rsassa",
         "-p", f"file:{cfg.ak_auth}", "-o", "forged.sig", "forged.msg")  # fmt: skip
    pem = TpmTools(tpm.tcti).ak_public(cfg.ak_handle)
    assert pem is not None
    sig = (work / "forged.sig").read_bytes()
    assert check_signature(pem, msg, sig, forged_extra) is None  # the forgery verifies

    att = Attestation(None, cfg, TpmTools(tpm.tcti))  # type: ignore[arg-type]
    with pytest.raises(TpmError) as e:
        att._ensure_ak()
    assert "is not an attestation key (not restricted)" in str(e.value)
    assert f"evict it (tpm2_evictcontrol -C o -c {hex(cfg.ak_handle)})" in str(e.value)
    assert f"remove {cfg.ak_auth}" in str(e.value)


def test_shyped_s_ak_is_a_restricted_no_da_key_and_an_older_one_is_still_used(
    tpm: Swtpm, tmp_path: Path
) -> None:
    """The AK shyped makes: restricted, sign, fixed to the TPM, noDA. An AK made by an older
    shyped (tpm2_createak: the same but without noDA) is still used (the upgrade path:
    evict it and re-enrol to get noDA, docs/attestation.md)."""
    tools = TpmTools(tpm.tcti)
    cfg = config(tpm, tmp_path)
    Attestation(None, cfg, tools)._ensure_ak()  # type: ignore[arg-type]
    raw = tools.ak_public_area(cfg.ak_handle)
    assert raw is not None
    area = akpublic.parse_public(raw)
    assert akpublic.ak_problems(area) == [] and area.no_da
    tpm2(tpm, tmp_path, "tpm2_evictcontrol", "-C", "o", "-c", hex(cfg.ak_handle))
    work = tmp_path / "old"
    work.mkdir()
    tpm2(tpm, work, "tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
    tpm2(tpm, work, "tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "rsa", "-g",
         "sha256", "-s", "rsassa", "-u", "ak.pub", "-n", "ak.name",
         "-p", f"file:{cfg.ak_auth}")  # fmt: skip
    tpm2(tpm, work, "tpm2_evictcontrol", "-C", "o", "-c", "ak.ctx", hex(cfg.ak_handle))
    raw = tools.ak_public_area(cfg.ak_handle)
    assert raw is not None and not akpublic.parse_public(raw).no_da
    Attestation(None, cfg, tools)._ensure_ak()  # type: ignore[arg-type]  # used, with a warning


@needs_users
@pytest_twisted.ensureDeferred
async def test_a_tpm_user_s_failed_auth_attempts_do_not_lock_the_ak_out(tmp_path: Path) -> None:
    """A ``tss`` member (here: a local user, as every local user reaches the swtpm port)
    tries auth values on the AK until the TPM is in dictionary-attack lockout (swtpm: 3
    failures). A DA-protected AK then refuses every quote until the lockout recovery time
    passes: shyped's AK is ``noDA`` and still quotes, and the quote verifies."""
    need_swtpm()
    with swtpm() as t, local_user("shyda") as user, tempfile.TemporaryDirectory() as work:
        d = stub_daemon(tmp_path, t)
        await d.attestation.start()
        assert d.attestation.unavailable is None, d.attestation.unavailable
        os.chmod(work, 0o777)
        guess = Path(work, "guess")
        guess.write_text("f" * 32)
        guess.chmod(0o644)
        env = {**os.environ, "TPM2TOOLS_TCTI": t.tcti}
        for _ in range(4):  # wrong auth values on the AK itself
            r = subprocess.run(
                [*setpriv(user), "tpm2_quote", "-c", hex(d.attestation.config.ak_handle),
                 "-l", "sha256:13", "-q", "00" * 32, "-m", "q.msg", "-s", "q.sig",
                 "-g", "sha256", "-p", f"file:{guess}"],
                cwd=work, env=env, capture_output=True, text=True, check=False,
            )  # fmt: skip
            assert r.returncode != 0, "a wrong auth value quoted"
        # and on a DA-protected key of their own (the owner hierarchy has no auth value):
        # failures on any DA-protected object count, the lockout then holds for all of them
        wrong = Path(work, "wrong")
        wrong.write_text("0" * 32)
        wrong.chmod(0o644)
        mine = Path(work, "mine")
        mine.mkdir()
        os.chmod(mine, 0o777)
        tpm2(t, mine, "tpm2_createprimary", "-C", "o", "-c", "p.ctx", "-p", f"file:{guess}",
             user=user)  # fmt: skip
        for _ in range(4):
            subprocess.run(
                [*setpriv(user), "tpm2_create", "-C", "p.ctx", "-P", f"file:{wrong}", "-G",
                 "rsa", "-u", "x.pub", "-r", "x.priv"],
                cwd=mine, env=env, capture_output=True, text=True, check=False,
            )  # fmt: skip
            TpmTools(t.tcti)._flush()
        lock = tpm2(t, Path(work), "tpm2_getcap", "properties-variable")
        answer = await d.attestation.quote("after-lockout")
    assert "inLockout: 1" in " ".join(lock.split()), lock
    bundle, ak = tmp_path / "b.json", tmp_path / "ak.pem"
    bundle.write_text(json.dumps(json.loads(answer)["bundle"]))
    r = verify(str(bundle), "--ak", str(ak), "--nonce", "after-lockout")
    assert r.returncode == 0, r.stdout


@needs_users
@pytest_twisted.ensureDeferred
async def test_a_tpm_user_disabling_the_endorsement_hierarchy_is_named_and_an_auth_stops_it(
    tmp_path: Path,
) -> None:
    """A ``tss`` member clears ``ehEnable`` (the endorsement hierarchy may disable itself, and
    its auth value is empty by default): the AK, an endorsement-hierarchy key, disappears
    until the next reboot. shyped cannot prevent it; its quote answer must name the TPM's
    reason (it said only ``Unable to run tpm2_quote``). With an endorsement auth value set
    after the AK was made (docs/attestation.md), the same user is refused and quotes go on."""
    need_swtpm()
    with swtpm() as t, local_user("shyeh") as user, tempfile.TemporaryDirectory() as work:
        os.chmod(work, 0o777)
        d = stub_daemon(tmp_path, t)
        await d.attestation.start()
        assert d.attestation.unavailable is None, d.attestation.unavailable
        hierarchy_off = ("tpm2_hierarchycontrol", "-C", "e", "ehEnable", "clear")
        # the recommended setting: an endorsement auth value, once the AK exists
        tpm2(t, Path(work), "tpm2_changeauth", "-c", "e", "file:" + str(auth_file(tmp_path / "e")))
        env = {**os.environ, "TPM2TOOLS_TCTI": t.tcti}
        r = subprocess.run([*setpriv(user), *hierarchy_off], cwd=work, env=env,
                           capture_output=True, text=True, check=False)  # fmt: skip
        assert r.returncode != 0, "a TPM user disabled a hierarchy that has an auth value"
        assert json.loads(await d.attestation.quote("with-auth"))["bundle"]["nonce"]
        # without it (the default): the user disables the hierarchy, the AK is gone
        tpm2(t, Path(work), "tpm2_changeauth", "-c", "e", "-p", f"file:{tmp_path / 'e'}")
        tpm2(t, Path(work), *hierarchy_off, user=user)
        with pytest.raises(AttestationUnavailable) as e:
            await d.attestation.quote("without")
    assert "the handle is not correct for the use" in str(e.value), e.value
