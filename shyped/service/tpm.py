"""The TPM through Debian's tpm2-tools, run as subprocesses (blocking: call off the reactor).

Why tpm2-tools rather than tpm2-pytss: Debian 12 packages them (``tpm2-tools`` 5.4, with the
``swtpm`` TCTI the tests use), they need no compiler or headers at install time, and their
``tpm2_checkquote`` lets a remote verifier check a quote with nothing of shyped but the bundle
(docs/attestation.md). Without a resource manager (``swtpm:`` TCTI) every command's transient
objects and sessions are flushed after it, or the TPM runs out of object slots.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Final

from shyped.attest.akpublic import AK_ATTRIBUTES

TIMEOUT: Final = 60.0
_TOOLS: Final = ("tpm2_createek", "tpm2_startauthsession", "tpm2_policysecret", "tpm2_create",
                 "tpm2_load", "tpm2_evictcontrol", "tpm2_readpublic", "tpm2_pcrread",
                 "tpm2_pcrextend", "tpm2_quote", "tpm2_flushcontext")  # fmt: skip


class TpmError(Exception):
    """A TPM command failed, or there is no TPM / no tpm2-tools."""


def _run(args: list[str], tcti: str | None, cwd: str | None = None) -> bytes:
    env = dict(os.environ)
    if tcti is not None:
        env["TPM2TOOLS_TCTI"] = tcti
    else:
        env.pop("TPM2TOOLS_TCTI", None)
    try:
        done = subprocess.run(
            args, env=env, cwd=cwd, capture_output=True, timeout=TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise TpmError(f"{args[0]} not found: install Debian's tpm2-tools") from None
    except subprocess.TimeoutExpired:
        raise TpmError(f"{args[0]}: no answer from the TPM in {TIMEOUT:g} s") from None
    if done.returncode != 0:
        raise TpmError(f"{args[0]} failed: {_reason(done.stderr, done.returncode)}")
    return done.stdout


def _reason(stderr: bytes, code: int) -> str:
    """The TPM's own reason from tpm2-tools' stderr: the last ``Esys_...(0x18B) - tpm:...``
    line (its response code decoded), else the last line (``Unable to run ...`` says
    nothing)."""
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    decoded = [ln for ln in lines if ln.startswith("ERROR: ") and "(0x" in ln and ") - " in ln]
    if decoded:
        return decoded[-1].removeprefix("ERROR: ")
    return lines[-1] if lines else f"exit {code}"


def _auth(flag: str, path: Path | None) -> list[str]:
    """tpm2-tools' argument for an auth value read from a file (never on the command line,
    where any local user would read it in /proc)."""
    return [] if path is None else [flag, f"file:{path}"]


class TpmTools:
    """One TPM, reached through `tcti`."""

    def __init__(self, tcti: str, scratch: Path | None = None) -> None:
        self.tcti = tcti
        #: where the commands' files (contexts, quotes) go, each in a private directory: the
        #: daemon's state directory, since under the shipped unit (ProtectSystem=strict,
        #: no PrivateTmp=) /tmp is read-only; None: the system's temporary directory
        self.scratch = scratch

    def _workdir(self) -> tempfile.TemporaryDirectory[str]:
        if self.scratch is not None:
            self.scratch.mkdir(parents=True, exist_ok=True, mode=0o750)
        return tempfile.TemporaryDirectory(prefix="shyped-tpm-", dir=self.scratch)

    def available(self) -> str | None:
        """Why this TPM cannot be used (None: it answers)."""
        missing = [t for t in _TOOLS if shutil.which(t) is None]
        if missing:
            return f"tpm2-tools missing ({', '.join(missing)}): apt-get install tpm2-tools"
        if self.tcti.startswith("device:"):
            dev = self.tcti.removeprefix("device:") or "/dev/tpmrm0"
            if not Path(dev).exists():
                return f"no TPM: {dev} does not exist"
        try:
            self.pcr_read(0)
        except TpmError as e:
            return f"the TPM at {self.tcti} does not answer: {e}"
        return None

    def _flush(self) -> None:
        """Flush transient objects and sessions (needed without a resource manager); a
        failure here is not the caller's error (the command's own error matters)."""
        for flag in ("-t", "-s"):
            with contextlib.suppress(TpmError):
                _run(["tpm2_flushcontext", flag], self.tcti)

    def _read_public(self, handle: int, form: str) -> bytes | None:
        with self._workdir() as tmp:
            out = Path(tmp) / "ak.pub"
            try:
                _run(["tpm2_readpublic", "-c", hex(handle), "-f", form, "-o", str(out)],
                     self.tcti)  # fmt: skip
            except TpmError:
                return None
            return out.read_bytes()

    def ak_public(self, handle: int) -> bytes | None:
        """The PEM public key of the persistent key at `handle`, None if there is none."""
        return self._read_public(handle, "pem")

    def ak_public_area(self, handle: int) -> bytes | None:
        """The marshalled TPM2B_PUBLIC of the persistent key at `handle` (its type and
        attributes: `shyped.attest.akpublic`), None if there is none."""
        return self._read_public(handle, "tss")

    def _endorsement_session(self, tmp: str) -> list[str]:
        """A policy session satisfying the EK's policy (PolicySecret of the endorsement
        hierarchy), as tpm2_createak opens it: the EK's auth for `tpm2_create`/`tpm2_load`."""
        _run(["tpm2_startauthsession", "--policy-session", "-S", "s.ctx"], self.tcti, tmp)
        _run(["tpm2_policysecret", "-S", "s.ctx", "-c", "e"], self.tcti, tmp)
        return ["-P", "session:s.ctx"]

    def ensure_ak(self, handle: int, auth: Path | None = None) -> bytes:
        """The attestation key at `handle`: created under the endorsement hierarchy (EK, then
        a restricted RSA-2048 RSASSA/SHA-256 signing key, fixed to the TPM and ``noDA``
        (`shyped.attest.akpublic.AK_ATTRIBUTES`), with the auth value in file `auth` if given)
        and made persistent if absent. Its PEM public part.

        ``tpm2_createak`` makes the same key but without ``noDA`` (it takes no attributes):
        its steps are run here one by one (EK policy session, create, load) with them."""
        found = self.ak_public(handle)
        if found is not None:
            return found
        with self._workdir() as tmp:
            try:
                _run(["tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"],
                     self.tcti, tmp)  # fmt: skip
                self._flush()
                _run(["tpm2_create", "-C", "ek.ctx", *self._endorsement_session(tmp), "-G",
                      "rsa2048:rsassa-sha256:null", "-g", "sha256", "-a", AK_ATTRIBUTES,
                      "-u", "ak.pub", "-r", "ak.priv", *_auth("-p", auth)],
                     self.tcti, tmp)  # fmt: skip
                self._flush()
                _run(["tpm2_load", "-C", "ek.ctx", *self._endorsement_session(tmp), "-u",
                      "ak.pub", "-r", "ak.priv", "-c", "ak.ctx"], self.tcti, tmp)  # fmt: skip
                self._flush()
                _run(["tpm2_evictcontrol", "-C", "o", "-c", "ak.ctx", hex(handle)],
                     self.tcti, tmp)  # fmt: skip
            finally:
                self._flush()
        found = self.ak_public(handle)
        if found is None:
            raise TpmError(f"the AK was made persistent at {hex(handle)} but cannot be read")
        return found

    def pcr_read(self, index: int) -> bytes:
        out = _run(["tpm2_pcrread", f"sha256:{index}"], self.tcti).decode()
        for line in out.splitlines():
            key, _, value = line.strip().partition(":")
            if key.strip() == str(index) and value.strip().lower().startswith("0x"):
                return bytes.fromhex(value.strip()[2:])
        raise TpmError(f"tpm2_pcrread: no sha256 value for PCR {index} in {out!r}")

    def extend(self, index: int, digest: bytes) -> None:
        _run(["tpm2_pcrextend", f"{index}:sha256={digest.hex()}"], self.tcti)

    def quote(
        self, handle: int, index: int, qualifying: bytes, auth: Path | None = None
    ) -> tuple[bytes, bytes]:
        """A quote of sha256 PCR `index` by the AK at `handle` (its auth value in file `auth`)
        with `qualifying` as its extraData: (TPMS_ATTEST, TPMT_SIGNATURE)."""
        with self._workdir() as tmp:
            try:
                _run(["tpm2_quote", "-c", hex(handle), "-l", f"sha256:{index}", "-q",
                      qualifying.hex(), "-m", "q.msg", "-s", "q.sig", "-g", "sha256",
                      *_auth("-p", auth)], self.tcti, tmp)  # fmt: skip
            finally:
                self._flush()
            return (Path(tmp) / "q.msg").read_bytes(), (Path(tmp) / "q.sig").read_bytes()


def check_signature(ak_pem: bytes, message: bytes, signature: bytes, extra: bytes) -> str | None:
    """Check a quote's signature with the AK's PEM public key, offline (``tpm2_checkquote``,
    no TPM needed). `extra` is the extraData in `message`. None: it verifies."""
    with tempfile.TemporaryDirectory(prefix="shyped-verify-") as tmp:
        for name, data in (("ak.pem", ak_pem), ("q.msg", message), ("q.sig", signature)):
            (Path(tmp) / name).write_bytes(data)
        try:
            _run(["tpm2_checkquote", "-u", "ak.pem", "-m", "q.msg", "-s", "q.sig", "-g",
                  "sha256", "-q", extra.hex()], None, tmp)  # fmt: skip
        except TpmError as e:
            return str(e)
    return None
