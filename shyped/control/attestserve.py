"""The attestation ops over a running daemon (`shyped.service.attestation`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred

from shyped.control.attestops import AttestAk, AttestQuote, AttestQuoteArgs, EncodedAttestQuote
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


def attest_quote(daemon: Daemon, args: AttestQuoteArgs) -> Deferred[AttestQuote]:
    from shyped.service.attestation import AttestationBusy, AttestationUnavailable

    att = _attestation(daemon)

    async def run() -> AttestQuote:
        try:
            return EncodedAttestQuote({}, await att.quote(args.nonce))
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
