"""The attestation ops over a running daemon (`shyped.service.attestation`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred

from shyped.control.attestops import AttestAk, AttestQuote, AttestQuoteArgs, EncodedAttestQuote
from shyped.control.caller import CALLER, Caller
from shyped.control.protocol import ControlError, ErrorCode

if TYPE_CHECKING:
    from shyped.service.daemon import Daemon


def _attestation(daemon: Daemon) -> Any:
    att = daemon.attestation
    if att is None:
        raise ControlError(
            ErrorCode.UNAVAILABLE, "attestation is off: set [attestation] enabled = true"
        )
    if att.unavailable is not None:
        raise ControlError(ErrorCode.UNAVAILABLE, f"attestation unavailable: {att.unavailable}")
    return att


def rate_limited_uid(caller: Caller | None) -> int | None:
    """The uid whose quotes are rate-limited (``[attestation] quotes_per_minute``), None for
    root and the admin group: they may already stop the daemon or load policies, and a
    verifier they run is theirs to pace. A call that did not come through the control server
    (no caller) is limited as uid -1: fail closed."""
    if caller is None:
        return -1
    if caller.peer.uid == 0 or caller.access == "admin":
        return None
    return caller.peer.uid


def attest_quote(daemon: Daemon, args: AttestQuoteArgs) -> Deferred[AttestQuote]:
    from shyped.service.attestation import (
        AttestationBusy,
        AttestationRateLimited,
        AttestationUnavailable,
    )

    att = _attestation(daemon)
    uid = rate_limited_uid(CALLER.get())  # now: the server sets it around this call only

    async def run() -> AttestQuote:
        try:
            return EncodedAttestQuote({}, await att.quote(args.nonce, uid))
        except AttestationRateLimited as e:
            details = {"reason": "rate-limited", "retry_after": round(e.retry_after, 1)}
            raise ControlError(ErrorCode.BUSY, str(e), details) from None
        except AttestationBusy as e:
            raise ControlError(ErrorCode.BUSY, str(e)) from None
        except ValueError as e:
            raise ControlError(ErrorCode.INVALID_ARGUMENT, str(e)) from None
        except AttestationUnavailable as e:
            raise ControlError(ErrorCode.UNAVAILABLE, f"attestation unavailable: {e}") from None

    return Deferred.fromCoroutine(run())


def attest_ak(daemon: Daemon) -> AttestAk:
    att = _attestation(daemon)
    return AttestAk(att.ak_pem.decode(), hex(att.config.ak_handle), att.config.pcr)
