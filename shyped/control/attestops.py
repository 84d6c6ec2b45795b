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
    """A ``shyped-attest/1`` bundle (`shyped.attest.quote`)."""

    bundle: dict[str, Any]


@attrs.frozen
class AttestAk:
    """The attestation key's public part (PEM), its persistent handle and the PCR."""

    pem: str
    handle: str
    pcr: int
