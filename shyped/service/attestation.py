"""TPM attestation on the daemon (docs/attestation.md): measure, log, quote.

`Attestation` is a collaborator of the `shyped.service.daemon.Daemon`: it observes the daemon's
audit events (``DaemonCore.event_observers``) and, after each, measures what changed of the
attested state (policy, mode, label store, audit rotations: `shyped.attest.measure.events_for`);
each measurement is appended to the measurement log (fsync) and then extended into the PCR. A
quote measures what is pending first, so it always covers the state it reports.

TPM commands are blocking subprocesses (`shyped.service.tpm`): they run on the reactor's thread
pool, one at a time (a `DeferredLock`), never on the reactor thread. Without a TPM the daemon
runs and the quote op answers why there is none.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, threads
from twisted.logger import Logger

from shyped.attest import akpublic, measure, quote
from shyped.attest.ratelimit import TokenBuckets
from shyped.service.attestconfig import AttestationConfig
from shyped.service.tpm import TpmError, TpmTools

if TYPE_CHECKING:  # the daemon's parts this uses (`shyped.service.daemon.Daemon` is one)
    from shyped.service.policylabels import PolicyAndLabels as Daemon

_log = Logger(namespace="shyped.attest")


class AttestationUnavailable(Exception):
    """No quote can be given (no TPM, a broken or full measurement log): why."""


class AttestationBusy(Exception):
    """A quote is being made and `MAX_QUEUED_QUOTES` more wait: try again."""


class AttestationRateLimited(AttestationBusy):
    """This uid asked for more quotes than ``[attestation] quote_burst`` at once and
    ``quotes_per_minute``: try again in `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


#: Quotes that may wait while one is made (the control server bounds the requests in flight
#: too: one per read-group connection class, a few for admins and root).
MAX_QUEUED_QUOTES = 2


class MeasurementLog:
    """The measurement log file: JSON lines (`shyped.attest.measure.Entry.line`), appended with
    O_APPEND and fsync, at most `max_bytes` (past it nothing is appended: fail closed)."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path, self.max_bytes = path, max_bytes

    def read(self) -> list[measure.Entry]:
        try:
            with self.path.open("rb") as f:
                data = f.read(self.max_bytes + 1)
        except FileNotFoundError:
            return []
        if len(data) > self.max_bytes:
            raise measure.LogError(f"{self.path}: larger than {self.max_bytes} bytes")
        if data and not data.endswith(b"\n"):
            # A crash in the middle of an append: that entry was never extended (the extend
            # follows the fsync of the whole line), so it is dropped, and only it.
            keep = data.rfind(b"\n") + 1
            os.truncate(self.path, keep)
            _log.warn("attestation: {path}: dropped {n} bytes of an entry torn by a crash",
                      path=str(self.path), n=len(data) - keep)  # fmt: skip
            data = data[:keep]
        return measure.parse_log(data.splitlines())

    def lines(self) -> list[bytes]:
        try:
            return self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return []

    def restart(self) -> None:
        """A new log (the PCR was reset: a reboot); the old one is kept as ``*.prev``."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        if self.path.exists():
            os.replace(self.path, self.path.with_name(self.path.name + ".prev"))

    def append(self, entry: measure.Entry) -> None:
        line = entry.line()
        size = self.path.stat().st_size if self.path.exists() else 0
        if size + len(line) > self.max_bytes:
            raise OSError(
                f"{self.path}: the measurement log is full ({self.max_bytes} bytes): no quote "
                "until shyped restarts with a larger [attestation] max_log_bytes (the log "
                "continues) or the host reboots (a new log)"
            )
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            if os.write(fd, line) != len(line):  # a full disk: nothing half-logged is extended
                os.ftruncate(fd, size)
                raise OSError(f"{self.path}: short write (the disk is full?)")
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_auth_directory(directory: Path) -> None:
    """The directory of ``ak_auth`` must be one only its owner (root) changes: whoever else may
    write it could plant the file with a value they know before the first start, or swap it
    between its creation and ``tpm2_createak`` reading it (a sticky directory is fine: others
    may not replace what is not theirs)."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return  # made below, 0750 root
    if st.st_uid not in (0, os.geteuid()):
        raise TpmError(
            f"{directory} (the directory of the AK's auth file) is owned by uid {st.st_uid}: "
            "that user could choose the AK's auth value; give it to root"
        )
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise TpmError(
            f"{directory} (the directory of the AK's auth file) is mode "
            f"{st.st_mode & 0o777:04o}: others could replace the auth file; make it 0750"
        )


def _check_auth_file(auth: Path) -> None:
    """``ak_auth`` must be a regular file of this uid (root), mode 0600, of 32 bytes: a file
    planted by another user holds a value that user knows (they would quote with the AK), a
    symlink is not followed."""
    try:
        fd = os.open(auth, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        why = "a symlink" if auth.is_symlink() else (e.strerror or str(e))
        raise TpmError(f"{auth}: not a regular file ({why}): the AK's auth file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TpmError(f"{auth}: not a regular file: the AK's auth file")
        if st.st_uid != os.geteuid():
            raise TpmError(
                f"{auth} is owned by uid {st.st_uid}, not {os.geteuid()}: its value may be "
                "known to that user; remove it (and evict the AK made with it)"
            )
        mode = st.st_mode & 0o777
        if mode & 0o077:
            raise TpmError(f"{auth} is mode {mode:04o}: the AK's auth value must be 0600")
        if len(os.read(fd, 33)) != 32:  # e.g. empty after a crash: an AK without a value
            raise TpmError(f"{auth} does not hold the AK's auth value (32 hex digits)")
    finally:
        os.close(fd)


def labels_doc(daemon: Daemon) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(daemon.engine.labels.to_json())
    return doc


def policy_doc(daemon: Daemon) -> dict[str, Any]:
    p = daemon.loaded.policy
    return {"name": p.name, "version": str(p.version), "sha256": daemon.loaded.sha256}


def audit_head(daemon: Daemon) -> dict[str, Any] | None:
    if daemon.audit is None or not daemon.audit.log.log_id:
        return None
    seq, head = daemon.audit.log.head
    return {"log": daemon.audit.log.log_id, "seq": seq, "hash": head}


def _rotations(daemon: Daemon) -> int:
    return 0 if daemon.audit is None else int(daemon.audit.log.stats.rotations)


class Attestation:
    """Measurements and quotes for one daemon (reactor thread only)."""

    def __init__(
        self,
        daemon: Daemon,
        config: AttestationConfig,
        tools: TpmTools | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.daemon, self.config = daemon, config
        self._clock = clock
        self._rates = TokenBuckets(config.quotes_per_minute, config.quote_burst)
        self.tools = tools or TpmTools(config.tcti, config.log.parent)
        self.log = MeasurementLog(config.log, config.max_log_bytes)
        self.ak_pem: bytes | None = None
        #: why no quote can be given now (None: quotes work)
        self.unavailable: str | None = "not started"
        self._measured: measure.Measured | None = None
        self._seq = 0
        self._run_entries: list[measure.Entry] = []  # measured since this daemon started
        self._lock = defer.DeferredLock()
        self._pending: defer.Deferred[None] | None = None
        self._quotes = 0  # being made or waiting
        self._digested: tuple[object, str] = (None, "")  # (label store, its labels_digest)

    def _thread(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        reactor = self.daemon.reactor
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    async def start(self) -> None:
        """Find the TPM and the AK, bring the log in line with the PCR, measure the start.
        Never fails: without a TPM, `unavailable` says why and the daemon runs."""
        try:
            why = await self._thread(self.tools.available)
            if why is not None:
                raise TpmError(why)
            self.ak_pem = await self._thread(self._ensure_ak)
            await self._thread(self._export_ak, self.ak_pem)
            await self._thread(self._resume_log)
        except (TpmError, OSError, measure.LogError) as e:
            self.unavailable = str(e)
            _log.error("attestation unavailable: {why}", why=self.unavailable)
            return
        self.unavailable = None
        self.daemon.event_observers.append(self.observe)
        await self.sync()
        _log.info("attestation: PCR {pcr}, AK {ak}, {n} measurements in {log}",
                  pcr=self.config.pcr, ak=hex(self.config.ak_handle), n=self._seq,
                  log=str(self.config.log))  # fmt: skip

    def _ensure_ak(self) -> bytes:
        """(Thread pool.) The AK, with the auth value of the root-only file ``ak_auth``: made
        with a fresh random one at the first start; an AK without that file is not used (it was
        made without an auth value, which lets every member of the ``tss`` group quote with it,
        or by someone else)."""
        handle, auth = hex(self.config.ak_handle), self.config.ak_auth
        _check_auth_directory(auth.parent)
        if not auth.exists() and not auth.is_symlink():
            if self.tools.ak_public(self.config.ak_handle) is not None:
                raise TpmError(
                    f"the AK at {handle} has no auth file {auth} (made by an older shyped "
                    "without an auth value, which every tss group member may use, or by "
                    f"someone else): evict it (tpm2_evictcontrol -C o -c {handle}) so that "
                    f"shyped makes a new one, then enrol the new {self.config.ak_public}"
                )
            auth.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            fd = os.open(auth, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:  # 16 random bytes as 32 hex digits: the most a SHA-256 key's auth may hold
                os.write(fd, secrets.token_hex(16).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        _check_auth_file(auth)
        pem = self.tools.ensure_ak(self.config.ak_handle, auth)
        self._check_ak_attributes()
        try:  # a key put at the handle by someone else does not take shyped's auth value
            self.tools.quote(self.config.ak_handle, self.config.pcr, bytes(32), auth)
        except TpmError as e:
            raise TpmError(
                f"the key at {handle} does not quote with the auth value in {auth} (replaced "
                f"by someone else?): not exported, not used; evict it (tpm2_evictcontrol -C o "
                f"-c {handle}) and remove {auth} so that shyped makes a new AK, then enrol the "
                f"new {self.config.ak_public} ({e})"
            ) from None
        return pem

    def _check_ak_attributes(self) -> None:
        """(Thread pool.) The key at the handle must be a restricted signing key fixed to this
        TPM (`shyped.attest.akpublic`): a non-restricted key signs forged quotes too. One
        without ``noDA`` (made by a shyped before attest3) is used, with a warning: a TPM
        user's failed auth attempts can lock it out (docs/attestation.md)."""
        handle, auth = hex(self.config.ak_handle), self.config.ak_auth
        recover = (
            f"evict it (tpm2_evictcontrol -C o -c {handle}) and remove {auth} so that shyped "
            f"makes a new AK, then enrol the new {self.config.ak_public}"
        )
        raw = self.tools.ak_public_area(self.config.ak_handle)
        try:
            if raw is None:
                raise akpublic.PublicAreaError("tpm2_readpublic cannot read it")
            area = akpublic.parse_public(raw)
        except akpublic.PublicAreaError as e:
            raise TpmError(f"the key at {handle}: its public area: {e}; {recover}") from None
        problems = akpublic.ak_problems(area)
        if problems:
            raise TpmError(
                f"the key at {handle} is not an attestation key ({', '.join(problems)}): only "
                "a restricted signing key fixed to this TPM cannot sign a forged quote; not "
                f"exported, not used; {recover}"
            )
        if not area.no_da:
            _log.warn(
                "attestation: the AK at {handle} is not noDA: failed auth attempts by any TPM "
                "user (the tss group) can lock it out and stop quotes; to upgrade, {recover}",
                handle=handle, recover=recover,
            )  # fmt: skip

    def _export_ak(self, pem: bytes) -> None:
        from shyped.fileio.atomicfile import write_atomic

        self.config.ak_public.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        write_atomic(self.config.ak_public, pem, mode=0o644)

    def _resume_log(self) -> None:
        """The PCR and the log agree (continue), the PCR is fresh (new log), or the last
        entry was logged but not extended (a crash in between: extend it now)."""
        pcr = self.tools.pcr_read(self.config.pcr)
        entries = self.log.read() if pcr != measure.PCR_RESET else []
        if pcr == measure.PCR_RESET:
            self.log.restart()
        elif (old := measure.log_versions(entries)) is not None:
            raise measure.LogError(
                f"{self.config.log}: {old}; a log of mixed formats would not verify: quotes "
                "resume after the next reboot starts a new log"
            )
        elif measure.replay(entries) != pcr:
            if entries and measure.replay(entries[:-1]) == pcr:
                self.tools.extend(self.config.pcr, entries[-1].digest)
            else:
                raise measure.LogError(
                    f"{self.config.log} does not replay to PCR {self.config.pcr} (lost or "
                    "edited, or another program extends that PCR): quotes would not verify; "
                    "it is consistent again after a reboot"
                )
        self._seq = len(entries)

    def observe(self, _kind: str) -> None:
        """An audit event happened: measure what changed, once per reactor turn."""
        if self._pending is None:
            self._pending = defer.Deferred.fromCoroutine(self._sync_soon())

    async def _sync_soon(self) -> None:
        try:
            await self.sync()
        finally:
            self._pending = None

    async def sync(self) -> None:
        """Measure everything that changed since the last measurement."""
        await self._lock.acquire()
        try:
            await self._measure_pending()
        finally:
            self._lock.release()

    def _pending_events(self) -> list[dict[str, Any]]:
        d = self.daemon
        return measure.events_for(
            self._measured, policy=policy_doc(d), mode=d.mode.value,
            labels=self._labels_digest(), rotations=_rotations(d),
            audit_head=audit_head(d),
        )  # fmt: skip

    def _labels_digest(self) -> str:
        """The digest of the label store in use, computed once per store (stores are frozen:
        every change makes a new one)."""
        store = self.daemon.engine.labels
        if store is not self._digested[0]:
            self._digested = (store, measure.labels_digest(labels_doc(self.daemon)))
        return self._digested[1]

    async def _measure_pending(self) -> None:
        """(Lock held.) Measure until nothing is pending; the daemon may change while a
        measurement is on its way to the TPM, so look again after each round."""
        while self.unavailable is None and (events := self._pending_events()):
            for event in events:
                try:
                    entry = measure.make_entry(self._seq, event)
                    await self._thread(self._measure, entry)
                except (TpmError, OSError, ValueError) as e:
                    self.unavailable = f"measurement {event['kind']} failed: {e}"
                    _log.error("attestation: {why}; no quote is given from now on",
                               why=self.unavailable)  # fmt: skip
                    return
                self._seq += 1
                self._run_entries.append(entry)
                self._measured = measure.measured_state(self._run_entries)

    def _measure(self, entry: measure.Entry) -> None:
        self.log.append(entry)  # durable first: a crash before the extend is repaired
        self.tools.extend(self.config.pcr, entry.digest)

    def state_report(self) -> dict[str, Any]:
        d = self.daemon
        domains = [
            {"domid": dom.domid, "name": dom.name, "uuid": dom.uuid, "label": dom.label}
            for dom in sorted(d.host.domains(), key=lambda x: x.domid)
            if dom.label is not None
        ]
        return {
            "host": os.uname().nodename,
            "policy": policy_doc(d),
            "mode": d.mode.value,
            "labels": labels_doc(d),
            "domains": domains,
            "audit_head": audit_head(d),
        }

    async def quote(self, nonce: str, uid: int | None = None) -> bytes:
        """The control answer for a quote for `nonce`: ``{"bundle": ...}`` encoded
        (`shyped.attest.quote.encode_answer`). One quote at a time: `MAX_QUEUED_QUOTES` more
        wait their turn, any further is refused (`AttestationBusy`); a `uid` (None: root, an
        admin, the daemon itself) past its token bucket is refused (`AttestationRateLimited`).
        Only the state report is built on the reactor thread (it must be the state just
        measured); the TPM, the log and the encoding of the bundle run on the thread pool."""
        bad = quote.check_nonce(nonce)
        if bad is not None:
            raise ValueError(bad)
        if self._quotes > MAX_QUEUED_QUOTES:
            raise AttestationBusy(
                f"attestation busy: a quote is being made and {self._quotes - 1} wait; "
                "try again shortly"
            )
        if uid is not None and (wait := self._rates.take(uid, self._clock())) is not None:
            cfg = self.config
            raise AttestationRateLimited(
                f"attestation rate-limited: uid {uid} may ask for {cfg.quote_burst} quotes at "
                f"once and {cfg.quotes_per_minute} a minute ([attestation] quote_burst, "
                f"quotes_per_minute); try again in {wait:.0f} s",
                wait,
            )
        self._quotes += 1
        try:
            await self._lock.acquire()
            try:
                await self._measure_pending()
                if self.unavailable is not None:
                    raise AttestationUnavailable(self.unavailable)
                # nothing pending now, and no await before the report: it is the measured state
                state = self.state_report()
                qualifying = quote.qualifying_data(nonce, state)
                msg, sig = await self._thread(
                    self.tools.quote, self.config.ak_handle, self.config.pcr, qualifying,
                    self.config.ak_auth,
                )  # fmt: skip
                encoded: bytes = await self._thread(self._encode, nonce, msg, sig, state)
                return encoded
            except TpmError as e:
                raise AttestationUnavailable(f"the TPM refused the quote: {e}") from None
            finally:
                self._lock.release()
        finally:
            self._quotes -= 1

    def _encode(self, nonce: str, msg: bytes, sig: bytes, state: dict[str, Any]) -> bytes:
        """(Thread pool.) The bundle with the log as it is now, encoded."""
        doc = quote.bundle_doc(nonce, self.config.pcr, msg, sig, self.log.lines(), state)
        return quote.encode_answer(doc)


def attach_attestation(daemon: Daemon) -> Attestation | None:
    """The daemon's attestation if ``[attestation] enabled``; start it with `start`."""
    cfg = daemon.config.attestation
    if not cfg.enabled:
        return None
    return Attestation(daemon, cfg)
