"""The attestation key's public area (a marshalled TPM2B_PUBLIC, TPM 2.0 Part 2, 12.2.5): what
shyped requires of the key at ``ak_handle`` before it quotes with it or exports it.

An AK must be a **restricted signing key fixed to its TPM**: ``restricted`` makes the TPM refuse
to sign a digest that starts with TPM_GENERATED_VALUE unless the TPM made it (a quote), so a
non-restricted key would sign a forged TPMS_ATTEST as readily as a true one; ``fixedTPM`` and
``fixedParent`` keep the private part in this TPM (no duplicate elsewhere), ``sensitiveDataOrigin``
says the TPM made it (nobody imported a private key they keep); ``sign`` and not ``decrypt``: a
signing key only; ``userWithAuth``: shyped authorises with the auth value (``ak_auth``).
``noDA`` (shyped's AKs since attest3) exempts it from the dictionary-attack lockout: wanted, not
required (an older AK without it still quotes, see docs/attestation.md).
"""

from __future__ import annotations

import struct
from typing import Final

import attrs

#: TPMA_OBJECT bits (TPM 2.0 Part 2, 8.3.2).
FIXED_TPM: Final = 1 << 1
FIXED_PARENT: Final = 1 << 4
SENSITIVE_DATA_ORIGIN: Final = 1 << 5
USER_WITH_AUTH: Final = 1 << 6
NO_DA: Final = 1 << 10
RESTRICTED: Final = 1 << 16
DECRYPT: Final = 1 << 17
SIGN: Final = 1 << 18

REQUIRED: Final = {
    FIXED_TPM: "fixedTPM",
    FIXED_PARENT: "fixedParent",
    SENSITIVE_DATA_ORIGIN: "sensitiveDataOrigin",
    USER_WITH_AUTH: "userWithAuth",
    RESTRICTED: "restricted",
    SIGN: "sign",
}
FORBIDDEN: Final = {DECRYPT: "decrypt"}
#: What shyped makes (``tpm2_create -a``): the required attributes and noDA.
AK_ATTRIBUTES: Final = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign|noda"
_ALG_RSA: Final = 0x0001
_ALG_ECC: Final = 0x0023


class PublicAreaError(ValueError):
    """Bytes that are not a marshalled TPM2B_PUBLIC."""


@attrs.frozen
class PublicArea:
    type: int
    name_alg: int
    attributes: int

    @property
    def no_da(self) -> bool:
        return bool(self.attributes & NO_DA)


def parse_public(data: bytes) -> PublicArea:
    """The type, name algorithm and attributes of a TPM2B_PUBLIC (``tpm2_readpublic -o``)."""
    if len(data) < 10:
        raise PublicAreaError(f"a TPM2B_PUBLIC of {len(data)} bytes is too short")
    size, typ, name_alg, attributes = struct.unpack(">HHHI", data[:10])
    if size != len(data) - 2:
        raise PublicAreaError(f"TPM2B_PUBLIC size {size} but {len(data) - 2} bytes follow")
    return PublicArea(typ, name_alg, attributes)


def ak_problems(area: PublicArea) -> list[str]:
    """Why the key is no AK shyped may quote with (empty: it is a restricted signing key
    fixed to its TPM)."""
    problems = [f"not {name}" for bit, name in REQUIRED.items() if not area.attributes & bit]
    problems += [name for bit, name in FORBIDDEN.items() if area.attributes & bit]
    if area.type not in (_ALG_RSA, _ALG_ECC):
        problems.append(f"not a signing key type (TPM_ALG 0x{area.type:04x})")
    return problems
