"""PURE TPM attestation (docs/attestation.md): measurement events and their log, the replay of
a log to a PCR value, the quote's signed fields (TPMS_ATTEST) and the verifier's checks.

Everything except the TPM I/O and the signature check, which the edge
(`shyped.service.attestation`, tpm2-tools) does.
"""
