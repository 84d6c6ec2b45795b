"""TPM attestation against a real software TPM (swtpm) and the real daemon (a child process on
a sandbox host): quotes over the running daemon's state verify offline; a policy file edited
on disk is not what is attested, a switch is; a tampered log, a replayed quote, another TPM's
quote and an edited label are each rejected naming why (docs/attestation.md)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from control_daemon_helpers import Host, sandbox_host
from test_control_daemon import BANK_A_DISK, BANK_A_VIF, create
from tpm_helpers import Swtpm, need_swtpm, swtpm

from shyped.attest import measure
from shyped.sandbox.xenstored import SandboxXenstored
from shyped.service.attestation import Attestation
from shyped.service.attestconfig import AttestationConfig
from shyped.service.tpm import TpmTools


@pytest.fixture
def tpm() -> Iterator[Swtpm]:
    need_swtpm()
    with swtpm() as t:
        yield t


@pytest.fixture
def host(xenstored: SandboxXenstored, tpm: Swtpm) -> Iterator[Host]:
    with sandbox_host(xenstored) as h:
        h.extra = (
            f'[attestation]\nenabled = true\ntcti = "{tpm.tcti}"\npcr = 13\n'
            f'log = "{h.directory / "measurements.jsonl"}"\n'
            f'ak_public = "{h.directory / "ak.pem"}"\n'
            f'ak_auth = "{h.directory / "ak.auth"}"\n'
        )
        yield h


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout


def quote(host: Host, nonce: str, name: str) -> Path:
    out = host.directory / name
    ok(host.ctl("attest", "quote", "--nonce", nonce, "-o", str(out)))
    return out


def verify(host: Host, bundle: Path, nonce: str, ak: Path | None = None):  # type: ignore[no-untyped-def]
    ak = ak or host.directory / "ak-export.pem"
    return host.ctl("attest", "verify", str(bundle), "--ak", str(ak), "--nonce", nonce)


def verify_json(host: Host, bundle: Path, nonce: str) -> dict:  # type: ignore[type-arg]
    ak = str(host.directory / "ak-export.pem")
    return json.loads(  # type: ignore[no-any-return]
        ok(host.ctl("--json", "attest", "verify", str(bundle), "--ak", ak, "--nonce", nonce))
    )


def rewrite(path: Path, change) -> Path:  # type: ignore[no-untyped-def]
    doc = json.loads(path.read_text())
    change(doc)
    out = path.with_name("edited-" + path.name)
    out.write_text(json.dumps(doc))
    return out


def test_quotes_verify_and_follow_switches_not_files_and_forgeries_fail(
    host: Host, tpm: Swtpm
) -> None:
    host.start()
    create(host, "web-a1", "bank-a-web", disks=BANK_A_DISK, vifs=BANK_A_VIF)
    ok(host.ctl("attest", "ak-pub", "-o", str(host.directory / "ak-export.pem")))
    assert (host.directory / "ak-export.pem").read_bytes() == (
        host.directory / "ak.pem"
    ).read_bytes()
    original = hashlib.sha256(host.policy.read_bytes()).hexdigest()

    b1 = quote(host, "nonce-1", "b1.json")
    out = ok(verify(host, b1, "nonce-1"))
    assert "VERIFIED" in out and f"sha256:     {original}" in out
    assert any(ln.split()[1:] == ["web-a1", "bank-a-web"] for ln in out.splitlines()[5:]), out
    pcr1 = verify_json(host, b1, "nonce-1")["pcr"]
    # the PCR really holds the replayed log (read from the TPM itself)
    assert TpmTools(tpm.tcti).pcr_read(13).hex() == pcr1

    # the policy file changed on disk, no switch: the attested policy is still the running one
    text = host.policy.read_text().replace(
        'version = "1.0"\n',
        'version = "1.1"\nfrom = { name = "example.hosting", version = "1.0" }\n',
        1,
    )
    host.policy.write_text(text)
    edited = hashlib.sha256(host.policy.read_bytes()).hexdigest()
    b2 = quote(host, "nonce-2", "b2.json")
    out = ok(verify(host, b2, "nonce-2"))
    assert f"sha256:     {original}" in out and edited not in out

    # a switch is measured: a new PCR value, the verifier shows the new sha256
    ok(host.ctl("policy", "load"))
    b3 = quote(host, "nonce-3", "b3.json")
    out = ok(verify(host, b3, "nonce-3"))
    assert f"sha256:     {edited}" in out
    v3 = verify_json(host, b3, "nonce-3")
    assert v3["pcr"] != pcr1 and v3["policy"]["sha256"] == edited

    # a replayed old quote: the verifier's fresh nonce is not the one the TPM signed
    r = verify(host, b1, "nonce-4")
    assert r.returncode == 1 and "the quote was made for nonce 'nonce-1'" in r.stdout
    assert "replayed" in r.stdout

    # a tampered log entry: the policy of the start event swapped for the edited file's
    def swap_start(doc: dict) -> None:  # type: ignore[type-arg]
        first = json.loads(doc["log"][0])
        first["event"]["policy"]["sha256"] = edited
        doc["log"][0] = json.dumps(first)

    r = verify(host, rewrite(b3, swap_start), "nonce-3")
    assert r.returncode == 1
    assert "log entry 0 ('start'): its digest does not match its event" in r.stdout

    # ... and with its digest recomputed: the log no longer replays to the quoted PCR
    def swap_and_rehash(doc: dict) -> None:  # type: ignore[type-arg]
        first = json.loads(doc["log"][0])
        first["event"]["policy"]["sha256"] = edited
        first["digest"] = measure.digest(first["event"]).hex()
        doc["log"][0] = json.dumps(first)

    r = verify(host, rewrite(b3, swap_and_rehash), "nonce-3")
    assert r.returncode == 1 and "which is not the value the TPM quoted" in r.stdout
    assert "digest does not match" not in r.stdout

    # an edited label in the reported state (and the store reported with it)
    def relabel(doc: dict) -> None:  # type: ignore[type-arg]
        for dom in doc["state"]["domains"]:
            if dom["name"] == "web-a1":
                dom["label"] = "bank-b-web"

    r = verify(host, rewrite(b3, relabel), "nonce-3")
    assert r.returncode == 1
    assert "state report: it is not the one the TPM signed" in r.stdout
    assert (
        "domain 'web-a1'" in r.stdout
        and "the measured label store assigns 'bank-a-web'" in r.stdout
    )

    # an edited label store in the reported state: not the store the log measured
    def edit_store(doc: dict) -> None:  # type: ignore[type-arg]
        doc["state"]["labels"]["domains"]["name"]["web-a1"] = "bank-b-web"

    r = verify(host, rewrite(b3, edit_store), "nonce-3")
    assert r.returncode == 1 and "label store: the reported store has sha256" in r.stdout
    assert "(edited, or not the store in force)" in r.stdout

    # a quote from another TPM: this host's bundle checked with another TPM's AK, and
    # another TPM's quote presented with this host's AK
    with swtpm() as other:
        other_ak = host.directory / "other-ak.pem"
        other_ak.write_bytes(TpmTools(other.tcti).ensure_ak(0x8101A770))
        r = verify(host, b3, "nonce-3", other_ak)
        assert r.returncode == 1 and "signature: the quote does not verify with this AK" in r.stdout

    # the untouched bundle still verifies (the checks above did not pass by accident)
    assert verify(host, b3, "nonce-3").returncode == 0


def test_a_local_tpm_user_cannot_quote_with_the_ak_and_its_extends_are_detected(
    host: Host, tpm: Swtpm
) -> None:
    """Debian's tpm-udev gives /dev/tpmrm0 mode 0660 tss:tss: every tss member reaches the
    TPM, as every local user reaches the tests' swtpm port. Played as such a user: a quote
    with the host's AK over a forged state report (a running domain hidden) -- with an AK
    without an auth value it is signed and verifies; shyped's AK needs the value of a
    root-only file. The same user extending PCR 13 cannot be prevented: every later quote
    fails verification, naming the replay."""
    import base64
    import os
    import tempfile

    from user_helpers import local_user, setpriv

    from shyped.attest import quote as attest_quote

    host.start()
    create(host, "web-a1", "bank-a-web", disks=BANK_A_DISK, vifs=BANK_A_VIF)
    assert (host.directory / "ak.auth").stat().st_mode & 0o777 == 0o600
    ok(host.ctl("attest", "ak-pub", "-o", str(host.directory / "ak-export.pem")))
    doc = json.loads(quote(host, "n", "b.json").read_text())
    doc["state"]["domains"] = [d for d in doc["state"]["domains"] if d["name"] != "web-a1"]
    forged_data = attest_quote.qualifying_data("n", doc["state"])
    env = {**os.environ, "TPM2TOOLS_TCTI": tpm.tcti}
    with local_user("shyat") as user, tempfile.TemporaryDirectory() as work:
        os.chmod(work, 0o777)
        r = subprocess.run(
            [*setpriv(user), "tpm2_quote", "-c", "0x8101a770", "-l", "sha256:13", "-q",
             forged_data.hex(), "-m", "q.msg", "-s", "q.sig", "-g", "sha256"],
            cwd=work, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if r.returncode == 0:
            doc["quote"] = {
                "message": base64.b64encode(Path(work, "q.msg").read_bytes()).decode(),
                "signature": base64.b64encode(Path(work, "q.sig").read_bytes()).decode(),
            }
            forged = host.directory / "forged.json"
            forged.write_text(json.dumps(doc))
            v = verify(host, forged, "n")
            assert v.returncode == 1, f"a local user's quote with the AK verified:\n{v.stdout}"
        assert r.returncode != 0, r.stderr
        assert "authorization" in r.stderr.lower() or "auth" in r.stderr.lower(), r.stderr
        r = subprocess.run(
            [*setpriv(user), "tpm2_pcrextend", f"13:sha256={'ab' * 32}"],
            cwd=work, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr  # a TPM user may extend PCR 13: detected below
    r = verify(host, quote(host, "n2", "b2.json"), "n2")
    assert r.returncode == 1 and "which is not the value the TPM quoted" in r.stdout


def test_restart_continues_the_log_and_a_mode_switch_is_measured(host: Host) -> None:
    host.start()
    host.stop()
    host.start()
    ok(host.ctl("setenforce", "permissive"))
    ok(host.ctl("attest", "ak-pub", "-o", str(host.directory / "ak-export.pem")))
    b = quote(host, "n", "b.json")
    kinds = [json.loads(line)["event"]["kind"] for line in json.loads(b.read_text())["log"]]
    assert kinds == ["start", "start", "mode"]
    out = ok(verify(host, b, "n"))
    assert "mode:       permissive" in out

    def claim_enforcing(doc: dict) -> None:  # type: ignore[type-arg]
        doc["state"]["mode"] = "enforcing"

    r = verify(host, rewrite(b, claim_enforcing), "n")
    assert r.returncode == 1 and "mode: reported 'enforcing', measured 'permissive'" in r.stdout


def test_without_a_tpm_the_daemon_runs_and_says_why(xenstored: SandboxXenstored) -> None:
    from etcd_helpers import free_ports

    (port,) = free_ports(1)
    with sandbox_host(xenstored) as h:
        h.extra = (
            f'[attestation]\nenabled = true\ntcti = "swtpm:host=127.0.0.1,port={port}"\n'
            f'log = "{h.directory / "m.jsonl"}"\nak_public = "{h.directory / "ak.pem"}"\n'
        )
        h.start()
        ok(h.ctl("status"))
        r = h.ctl("attest", "quote", "--nonce", "n")
        assert r.returncode == 3 and "attestation unavailable" in r.stderr
        assert "does not answer" in r.stderr
        assert "attestation unavailable" in h.log()


def _one_measurement(
    tpm: Swtpm, tmp_path: Path
) -> tuple[AttestationConfig, TpmTools, Attestation, measure.Entry]:
    """An `Attestation` over the log and the TPM only (no daemon), with a start measured."""
    cfg = AttestationConfig(enabled=True, tcti=tpm.tcti, log=tmp_path / "m.jsonl",
                            ak_public=tmp_path / "ak.pem")  # fmt: skip
    tools = TpmTools(tpm.tcti)
    att = Attestation(None, cfg, tools)  # type: ignore[arg-type]  # the log and the TPM only
    att._resume_log()
    first = measure.make_entry(0, {"kind": "start", "policy": {}, "mode": "enforcing"})
    att._measure(first)
    return cfg, tools, att, first


def test_a_crash_between_log_and_extend_is_repaired_a_lost_log_refused(
    tpm: Swtpm, tmp_path: Path
) -> None:
    cfg, tools, att, first = _one_measurement(tpm, tmp_path)
    second = measure.make_entry(1, {"kind": "mode", "mode": "permissive"})
    att.log.append(second)  # the daemon died before the extend
    assert tools.pcr_read(13) == measure.replay([first])
    att._resume_log()
    assert tools.pcr_read(13) == measure.replay([first, second]) and att._seq == 2

    cfg.log.write_bytes(first.line())  # the log lost an entry: quotes could never verify
    with pytest.raises(measure.LogError, match="does not replay to PCR 13"):
        att._resume_log()


def test_audit_rotations_are_measured_and_the_head_reported(
    xenstored: SandboxXenstored, tpm: Swtpm
) -> None:
    with sandbox_host(xenstored) as h:
        h.extra = (
            f'[attestation]\nenabled = true\ntcti = "{tpm.tcti}"\n'
            f'log = "{h.directory / "m.jsonl"}"\nak_public = "{h.directory / "ak.pem"}"\n'
            f'ak_auth = "{h.directory / "ak.auth"}"\n'
            f'[audit]\ndirectory = "{h.directory / "audit"}"\nmax_file_bytes = 1024\n'
        )
        h.start()
        create(h, "web-a1", "bank-a-web", disks=BANK_A_DISK, vifs=BANK_A_VIF)
        ok(h.ctl("attest", "ak-pub", "-o", str(h.directory / "ak-export.pem")))
        b = quote(h, "n", "b.json")
        doc = json.loads(b.read_text())
        rotations = [json.loads(x)["event"] for x in doc["log"]]
        rotations = [e for e in rotations if e["kind"] == "audit-rotation"]
        assert rotations and rotations[-1]["head"]["seq"] > 0
        out = ok(verify(h, b, "n"))
        head = doc["state"]["audit_head"]
        assert f"audit head: seq {head['seq']} {head['hash']}" in out
        assert head["seq"] >= rotations[-1]["head"]["seq"]


def test_a_torn_last_line_from_a_crash_mid_write_is_dropped_not_fatal(
    tpm: Swtpm, tmp_path: Path
) -> None:
    """A crash (power loss) during the append leaves part of a line, never extended (the
    extend follows the fsync): the next start drops it and continues; a complete line that
    does not parse is still refused."""
    cfg, tools, att, first = _one_measurement(tpm, tmp_path)
    second = measure.make_entry(1, {"kind": "mode", "mode": "permissive"})
    with cfg.log.open("ab") as f:
        f.write(second.line()[:40])  # the daemon died in the write
    att._resume_log()
    assert att._seq == 1 and cfg.log.read_bytes() == first.line()
    assert tools.pcr_read(13) == measure.replay([first])
    with cfg.log.open("ab") as f:
        f.write(b"not json\n")
    with pytest.raises(measure.LogError, match="not JSON"):
        att._resume_log()


def test_a_short_write_is_not_extended_and_leaves_no_torn_line(
    tpm: Swtpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk takes part of a line: the measurement fails before the extend (no quote
    from then on) and the log keeps only whole entries, so it still replays to the PCR."""
    import os

    from shyped.service import attestation

    cfg, tools, att, first = _one_measurement(tpm, tmp_path)
    real = os.write
    monkeypatch.setattr(attestation.os, "write", lambda fd, data: real(fd, data[:30]))
    second = measure.make_entry(1, {"kind": "mode", "mode": "permissive"})
    with pytest.raises(OSError, match="short write"):
        att._measure(second)
    monkeypatch.setattr(attestation.os, "write", real)
    assert cfg.log.read_bytes() == first.line()
    assert tools.pcr_read(13) == measure.replay([first])


def test_thousands_of_label_changes_on_a_large_store_still_quote_and_verify(host: Host) -> None:
    """2,000 labelled domains (a ~110 KB store) and 2,000 relabels of a running domain: each
    measurement of the store is one small log entry (its digest), so a 1 MiB log holds them
    all and the quote verifies. Format 1 measured the whole store each time: ~9 measurements
    filled the log, and no quote was given until a reboot."""
    from shyped.control.client import ControlClient

    doc = json.loads(host_labels(host).read_text())
    uuids = [f"5a0e0000-0000-4000-8000-{i:012x}" for i in range(10, 2010)]
    doc["domains"]["uuid"].update({u: "bank-a-web" for u in uuids})
    host_labels(host).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    host.extra += "max_log_bytes = 1048576\n"
    host.start()
    create(host, "web-a1", "bank-a-web", disks=BANK_A_DISK, vifs=BANK_A_VIF)
    labels = ("bank-a-batch", "bank-a-web")
    with ControlClient(host.socket, timeout=60) as c:
        for i in range(2000):
            c.relabel_domain("web-a1", labels[i % 2])
    ok(host.ctl("attest", "ak-pub", "-o", str(host.directory / "ak-export.pem")))
    b = quote(host, "churn", "b.json")
    out = verify_json(host, b, "churn")
    assert out["verified"] and not out["problems"], out
    assert [d["label"] for d in out["domains"] if d["name"] == "web-a1"] == ["bank-a-web"]
    log = json.loads(b.read_text())["log"]
    changes = [x for x in log if json.loads(x)["event"]["kind"] == "labels"]
    assert 10 <= len(changes) <= 2000 and max(len(x) for x in log) < 1024
    store = json.loads(b.read_text())["state"]["labels"]
    assert len(store["domains"]["uuid"]) >= 2000


def host_labels(host: Host) -> Path:
    """The host's label store file, written as the daemon would find it at start."""
    host.write_config()
    return host.labels


def test_an_ak_without_shyped_s_auth_file_is_not_used(tpm: Swtpm, tmp_path: Path) -> None:
    """An AK at the handle but no auth file (an older shyped's AK, usable by every tss member,
    or someone else's): refused at start naming how to recover; an auth file others may read
    is refused too, and so is a key at the handle that does not take the auth value."""
    from shyped.service.tpm import TpmError

    files = {"log": tmp_path / "m.jsonl", "ak_public": tmp_path / "ak.pem",
             "ak_auth": tmp_path / "ak.auth"}  # fmt: skip
    cfg = AttestationConfig(enabled=True, tcti=tpm.tcti, **files)
    att = Attestation(None, cfg, TpmTools(tpm.tcti))  # type: ignore[arg-type]
    TpmTools(tpm.tcti).ensure_ak(cfg.ak_handle)  # no auth value
    with pytest.raises(TpmError, match=r"has no auth file .* evict it \(tpm2_evictcontrol"):
        att._ensure_ak()
    assert not cfg.ak_auth.exists()
    cfg.ak_auth.write_text("")  # a crash between its creation and its write
    cfg.ak_auth.chmod(0o600)
    with pytest.raises(TpmError, match=r"does not hold the AK's auth value \(32 hex digits\)"):
        att._ensure_ak()
    cfg.ak_auth.write_text("x" * 32)
    cfg.ak_auth.chmod(0o640)
    with pytest.raises(TpmError, match="is mode 0640: the AK's auth value must be 0600"):
        att._ensure_ak()
    # with its auth file, the key at the handle must take it: a key put there by a TPM user
    # (the one above, without an auth value) is neither exported nor used
    cfg.ak_auth.chmod(0o600)
    with pytest.raises(TpmError, match=r"does not quote with the auth value .* not exported"):
        att._ensure_ak()
    assert not cfg.ak_public.exists()


def test_a_format_1_log_behind_the_pcr_is_not_continued(tpm: Swtpm, tmp_path: Path) -> None:
    """shyped upgraded without a reboot: the log behind PCR 13 is format 1 (whole label
    stores). Appending format-2 entries would give a log no verifier reads: no quote, saying
    why and until when."""
    cfg = AttestationConfig(enabled=True, tcti=tpm.tcti, log=tmp_path / "m.jsonl")
    tools = TpmTools(tpm.tcti)
    old = {"kind": "start", "policy": {}, "mode": "enforcing", "labels": {"version": 1}}
    entry = measure.Entry(0, old, measure.digest(old))
    cfg.log.write_bytes(entry.line())
    tools.extend(13, entry.digest)
    att = Attestation(None, cfg, tools)  # type: ignore[arg-type]  # the log and the TPM only
    with pytest.raises(measure.LogError, match=r"measurement format 1 .* after the next reboot"):
        att._resume_log()


def test_the_documented_ek_credential_exchange_binds_the_ak(tpm: Swtpm, tmp_path: Path) -> None:
    """docs/attestation.md, *Binding the AK to the TPM's EK*, run as written (tpm2-tools on
    the host with shyped's AK and its auth file; makecredential offline): the secret comes
    back only from the TPM holding that AK; another TPM's EK does not release it."""
    import os
    import re

    doc = (Path(__file__).parent.parent / "docs" / "attestation.md").read_text()
    block = doc.split("### Binding the AK to the TPM's EK", 1)[1].split("```", 2)[1]
    commands = [c for c in block.replace("\\\n", " ").splitlines() if c.startswith("tpm2_")]
    auth = tmp_path / "ak.auth"
    auth.write_text("0123456789abcdef0123456789abcdef")
    auth.chmod(0o600)
    TpmTools(tpm.tcti).ensure_ak(0x8101A770, auth)
    (tmp_path / "secret.bin").write_bytes(os.urandom(16))

    def run(command: str, tcti: str | None) -> subprocess.CompletedProcess[str]:
        command = command.replace("/var/lib/shyped/attest/ak.auth", str(auth))
        name = (tmp_path / "ak.name").read_bytes().hex() if "makecredential" in command else ""
        argv = re.sub(r'"\$\(xxd -p -c 256 ak.name\)"', name, command).split()
        env = {k: v for k, v in os.environ.items() if k != "TPM2TOOLS_TCTI"}
        env.update({"TPM2TOOLS_TCTI": tcti} if tcti else {})
        return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                              check=False)  # fmt: skip

    for command in commands:
        if command.startswith("tpm2_getekcertificate"):
            continue  # swtpm has no manufacturer certificate
        offline = command.startswith("tpm2_makecredential")
        r = run(command, None if offline else tpm.tcti)
        assert r.returncode == 0, (command, r.stderr)
        if command.startswith("tpm2_createek"):
            TpmTools(tpm.tcti)._flush()
    assert (tmp_path / "secret.out").read_bytes() == (tmp_path / "secret.bin").read_bytes()

    # another TPM's EK (the verifier was given the wrong one): the host cannot unwrap
    (tmp_path / "secret.out").unlink()
    with swtpm() as other:
        assert run("tpm2_createek -c other.ctx -G rsa -u ek.pub", other.tcti).returncode == 0
    maker = next(c for c in commands if c.startswith("tpm2_makecredential"))
    assert run(maker, None).returncode == 0
    for command in commands[commands.index(maker) + 1 :]:
        r = run(command, tpm.tcti)
        if "activatecredential" in command:
            assert r.returncode != 0 and not (tmp_path / "secret.out").exists()
