"""The arguments and answers of the attestation ops (docs/attestation.md): ``attest_quote``
and ``attest_ak``, both ``read`` access: a quote tells what any verifier may learn."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class AttestQuoteArgs:
    nonce: str


@attrs.frozen
class AttestQuote:
    """A ``shyped-attest/2`` bundle (`shyped.attest.quote`)."""

    bundle: dict[str, Any]


@attrs.frozen
class EncodedAttestQuote(AttestQuote):
    """The daemon's side of an `AttestQuote`: the answer already encoded off the reactor thread
    (`encoded`: ``{"bundle": ...}`` as compact JSON, `shyped.attest.quote.encode_answer`), which
    the server writes as it is (`shyped.control.protocol.encode_result`); `bundle` is empty."""

    encoded: bytes = attrs.field(default=b"", repr=False)


@attrs.frozen
class AttestAk:
    """The attestation key's public part (PEM), its persistent handle and the PCR."""

    pem: str
    handle: str
    pcr: int
