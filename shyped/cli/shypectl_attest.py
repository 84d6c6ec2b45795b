"""``shypectl attest``: TPM quotes of what this host enforces, and their offline verification
(docs/attestation.md).

* ``attest ak-pub [-o FILE]``: the attestation key's public part (PEM), for verifiers;
* ``attest quote --nonce N [-o FILE]``: a quote bundle from the daemon (read access);
* ``attest verify BUNDLE --ak AKPUB --nonce N``: offline, on any machine with tpm2-tools:
  exit 0 and the verified policy, mode, labels and audit chain head, or exit 1 (`EXIT_DENIED`)
  naming every check that failed; 2 for a bundle or key that cannot be read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from shyped.cli.ctlcommon import EXIT_DENIED, EXIT_OK, Ctx, UsageError

#: A bundle carries the measurement log (at most 16 MiB by default); more is not one.
MAX_BUNDLE_BYTES = 64 << 20
MAX_AK_BYTES = 64 << 10


def _write(ctx: Ctx, path: Path | None, text: str) -> None:
    if path is None:
        ctx.say(text.rstrip("\n"))
        return
    from shyped.fileio.atomicfile import write_atomic

    try:
        write_atomic(path, text.encode(), mode=0o644)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


def cmd_ak_pub(ctx: Ctx) -> int:
    ak = ctx.client.attest_ak()
    if ctx.json:
        ctx.emit(ak, lambda: None)
    else:
        _write(ctx, ctx.args.output, ak.pem)
    return EXIT_OK


def cmd_quote(ctx: Ctx) -> int:
    res = ctx.client.attest_quote(ctx.args.nonce)
    _write(ctx, ctx.args.output, json.dumps(res.bundle, indent=1, sort_keys=True) + "\n")
    return EXIT_OK


def _read(path: Path, cap: int, what: str) -> bytes:
    from shyped.fileio.boundedread import read_bounded

    try:
        return read_bounded(path, cap, what)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None


def verify_bundle(doc: Any, ak_pem: bytes, nonce: str) -> tuple[list[str], Any]:
    """(problems, verdict) of a bundle: the signature (tpm2_checkquote) and every other
    check (`shyped.attest.quote.verify_fields`)."""
    from shyped.attest import quote
    from shyped.service.tpm import check_signature

    bundle = quote.parse_bundle(doc)
    verdict = quote.verify_fields(bundle, nonce)
    problems = list(verdict.problems)
    try:
        attest = quote.parse_attest(bundle.message)
    except quote.BundleError:
        return problems, verdict
    bad = check_signature(ak_pem, bundle.message, bundle.signature, attest.extra_data)
    if bad is not None:
        problems.insert(
            0,
            "signature: the quote does not verify with this AK (another TPM's quote, or a "
            f"forged one): {bad}",
        )
    return problems, verdict


def cmd_verify(ctx: Ctx) -> int:
    from shyped.attest import quote

    a = ctx.args
    bad_nonce = quote.check_nonce(a.nonce)
    if bad_nonce is not None:
        raise UsageError(bad_nonce)
    raw = _read(a.bundle, MAX_BUNDLE_BYTES, "bundle")
    ak = _read(a.ak, MAX_AK_BYTES, "AK public key")
    try:
        problems, v = verify_bundle(json.loads(raw), ak, a.nonce)
    except (ValueError, quote.BundleError) as e:
        raise UsageError(f"{a.bundle}: not a quote bundle: {e}") from None
    if ctx.json:
        doc = {
            "verified": not problems,
            "problems": problems,
            "policy": v.policy,
            "mode": v.mode,
            "pcr": None if v.pcr_value is None else v.pcr_value.hex(),
            "domains": list(v.domains),
            "audit_head": v.audit_head,
            "unverified": list(v.unverified),
        }
        ctx.say(json.dumps(doc, indent=2, sort_keys=True))
        return EXIT_DENIED if problems else EXIT_OK
    if problems:
        ctx.say(f"NOT VERIFIED: {len(problems)} problem(s)")
        for p in problems:
            ctx.say(f"  - {p}")
        return EXIT_DENIED
    pol = v.policy or {}
    pcr = "?" if v.pcr_value is None else v.pcr_value.hex()
    ctx.say(f"VERIFIED: quote by this AK for nonce {a.nonce!r}; PCR value {pcr}")
    ctx.say(f"policy:     {pol.get('name')} {pol.get('version')}")
    ctx.say(f"sha256:     {pol.get('sha256')}")
    ctx.say(f"mode:       {v.mode}")
    ctx.say("domains:")
    for d in v.domains:
        ctx.say(f"  {d.get('domid'):>5} {d.get('name') or '?':<24} {d.get('label')}")
    head = v.audit_head
    shown = "-" if head is None else f"seq {head.get('seq')} {head.get('hash')}"
    ctx.say(f"audit head: {shown}")
    for note in v.unverified:
        ctx.say(f"  (not covered by the measurements) {note}")
    return EXIT_OK


def add_attest_commands(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "attest", help="TPM attestation: quotes of the enforced policy and labels, and their "
        "offline verification (docs/attestation.md)",
    )  # fmt: skip
    asub = p.add_subparsers(dest="attest_command", required=True, metavar="COMMAND")
    q = asub.add_parser("ak-pub", help="the attestation key's public part (PEM)")
    q.add_argument("-o", "--output", type=Path, help="write it here")
    q.set_defaults(func=cmd_ak_pub)
    q = asub.add_parser("quote", help="a TPM quote over the measurements and the current state")
    q.add_argument("--nonce", required=True, help="the verifier's fresh nonce (text)")
    q.add_argument("-o", "--output", type=Path, help="write the bundle here (JSON)")
    q.set_defaults(func=cmd_quote)
    q = asub.add_parser(
        "verify", help="offline: check a bundle's signature, nonce, log replay and state; "
        "exit 0 verified, 1 not verified (every reason printed), 2 unreadable input",
    )  # fmt: skip
    q.add_argument("bundle", type=Path, help="the bundle `attest quote` wrote")
    q.add_argument("--ak", type=Path, required=True, help="the host's AK public key (PEM)")
    q.add_argument("--nonce", required=True, help="the nonce you sent")
    q.set_defaults(func=cmd_verify)
