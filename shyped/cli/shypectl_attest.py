"""``shypectl attest``: TPM quotes of what this host enforces, and their offline verification
(docs/attestation.md).

* ``attest ak-pub [-o FILE]``: the attestation key's public part (PEM), for verifiers;
* ``attest quote --nonce N [-o FILE]``: a quote bundle from the daemon (read access);
* ``attest verify BUNDLE... --ak AKPUB... --nonce N``: offline, on any machine with
  tpm2-tools, one bundle per host (a pool: each host attests itself): exit 0 and the verified
  policy, mode, labels and audit chain head of each, or exit 1 (`EXIT_DENIED`) naming every
  check that failed, per host and across hosts; 2 for a bundle or key that cannot be read.
"""

from __future__ import annotations

import argparse
import functools
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


def _verified_doc(problems: list[str], v: Any) -> dict[str, Any]:
    return {
        "verified": not problems,
        "problems": problems,
        "policy": v.policy,
        "mode": v.mode,
        "pcr": None if v.pcr_value is None else v.pcr_value.hex(),
        "domains": list(v.domains),
        "audit_head": v.audit_head,
        "unverified": list(v.unverified),
    }


def _say(ctx: Ctx, text: str) -> None:
    """A line of the text verdict: what a bundle says (host, domain and policy names, problems
    quoting them) comes from a file anyone may have written; its control characters are
    escaped, so it can neither start a line that looks like a verdict nor send the terminal an
    escape sequence (e.g. one that hides the lines after it)."""
    from shyped.core.audit import printable

    ctx.say(printable(text))


def _say_verdict(ctx: Ctx, nonce: str, problems: list[str], v: Any, indent: str = "") -> None:
    say = functools.partial(_say, ctx)
    if problems:
        say(f"{indent}NOT VERIFIED: {len(problems)} problem(s)")
        for p in problems:
            say(f"{indent}  - {p}")
        return
    pol = v.policy or {}
    pcr = "?" if v.pcr_value is None else v.pcr_value.hex()
    say(f"{indent}VERIFIED: quote by this AK for nonce {nonce!r}; PCR value {pcr}")
    say(f"{indent}policy:     {pol.get('name')} {pol.get('version')}")
    say(f"{indent}sha256:     {pol.get('sha256')}")
    say(f"{indent}mode:       {v.mode}")
    say(f"{indent}domains:")
    for d in v.domains:
        say(f"{indent}  {d.get('domid')!s:>5} {d.get('name') or '?'!s:<24} {d.get('label')}")
    head = v.audit_head
    shown = "-" if head is None else f"seq {head.get('seq')} {head.get('hash')}"
    say(f"{indent}audit head: {shown}")
    for note in v.unverified:
        say(f"{indent}  (not covered by the measurements) {note}")


def _pairs(a: Any) -> list[tuple[Path, Path, str]]:
    """(bundle, AK, nonce) per host: one --ak per bundle, in order; one --nonce for all or
    one per bundle."""
    from shyped.attest import quote

    bundles, aks, nonces = a.bundle, a.ak, a.nonce
    if len(aks) != len(bundles):
        raise UsageError(
            f"{len(bundles)} bundle(s) and {len(aks)} --ak: give each host's AK, in the order "
            "of the bundles"
        )
    if len(nonces) not in (1, len(bundles)):
        raise UsageError(f"give one --nonce for all bundles or one per bundle ({len(bundles)})")
    for n in nonces:
        if (bad := quote.check_nonce(n)) is not None:
            raise UsageError(bad)
    if len(nonces) == 1:
        nonces = nonces * len(bundles)
    return list(zip(bundles, aks, nonces, strict=True))


def _one(path: Path, ak_path: Path, nonce: str) -> tuple[list[str], Any, Any, bytes]:
    from shyped.attest import quote

    raw = _read(path, MAX_BUNDLE_BYTES, "bundle")
    ak = _read(ak_path, MAX_AK_BYTES, "AK public key")
    key = ak_identity(ak, ak_path)
    try:
        quote.check_value_count(raw)  # before json.loads builds every value (bounded memory)
        doc = json.loads(raw)
        del raw
        problems, verdict = verify_bundle(doc, ak, nonce)
    except (ValueError, quote.BundleError) as e:
        raise UsageError(f"{path}: not a quote bundle: {e}") from None
    except RecursionError:  # a bundle built to blow the decoder's (or the hash's) recursion
        raise UsageError(f"{path}: not a quote bundle: nested too deeply") from None
    state = doc.get("state") if isinstance(doc, dict) else None
    host = state.get("host") if isinstance(state, dict) else None
    return problems, verdict, host, key


def ak_identity(pem: bytes, path: Path) -> bytes:
    """The key itself (its SubjectPublicKeyInfo DER), whatever its PEM file's bytes: text
    around the block and line lengths differ between files of one key, which OpenSSL and
    ``tpm2_checkquote`` read alike (a host posing as two with its AK re-encoded). The
    ``cryptography`` package (pyOpenSSL's, already a dependency) parses it."""
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_pem_public_key,
    )

    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{path}: not a PEM public key ({e})") from None
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def cross_host_problems(hosts: list[tuple[str, Any, bytes]], *, same_policy: bool) -> list[str]:
    """What is wrong across hosts' verdicts ``(name, verdict, AK identity)`` (`ak_identity`):
    one AK for two bundles (one TPM posing as two hosts), and with `same_policy`, hosts that
    enforce different policies."""
    problems: list[str] = []
    seen: dict[bytes, str] = {}
    for name, _v, key in hosts:
        if key in seen:
            problems.append(
                f"AK: {name} and {seen[key]} are checked with the same AK (one TPM for two "
                "hosts: enrol each host's own AK)"
            )
        seen.setdefault(key, name)
    shas = {name: (v.policy or {}).get("sha256") for name, v, _ak in hosts}
    # compared as JSON: a forged log's sha256 may be any JSON value, a list is no crash here
    if same_policy and len({json.dumps(s, sort_keys=True) for s in shas.values()}) > 1:
        shown = ", ".join(f"{n} {s}" for n, s in shas.items())
        problems.append(f"policy: the hosts do not enforce the same policy ({shown})")
    return problems


def cmd_verify(ctx: Ctx) -> int:
    a = ctx.args
    results = []
    for path, ak_path, nonce in _pairs(a):
        problems, v, host, ak = _one(path, ak_path, nonce)
        results.append((path, nonce, problems, v, f"{host or '?'} ({path})", ak))
    if len(results) == 1 and not a.same_policy:
        _path, nonce, problems, v, _name, _ak = results[0]
        if ctx.json:
            ctx.say(json.dumps(_verified_doc(problems, v), indent=2, sort_keys=True))
        else:
            _say_verdict(ctx, nonce, problems, v)
        return EXIT_DENIED if problems else EXIT_OK
    across = cross_host_problems(
        [(name, v, ak) for _p, _n, _pr, v, name, ak in results], same_policy=a.same_policy
    )
    failed = across or any(problems for _p, _n, problems, _v, _nm, _ak in results)
    if ctx.json:
        hosts = [
            {**_verified_doc(problems, v), "bundle": str(path), "host": name.split(" (")[0]}
            for path, _n, problems, v, name, _ak in results
        ]
        doc = {"verified": not failed, "hosts": hosts, "problems": across}
        ctx.say(json.dumps(doc, indent=2, sort_keys=True))
        return EXIT_DENIED if failed else EXIT_OK
    for _path, nonce, problems, v, name, _ak in results:
        _say(ctx, f"== {name}")
        _say_verdict(ctx, nonce, problems, v, "   ")
    bad = sum(1 for r in results if r[2])
    for p in across:
        _say(ctx, f"across hosts: {p}")
    if failed:
        ctx.say(f"NOT VERIFIED: {bad} of {len(results)} host(s), {len(across)} across hosts")
        return EXIT_DENIED
    ctx.say(f"VERIFIED: all {len(results)} hosts")
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
        "verify", help="offline: check bundles' signatures, nonces, log replays and states "
        "(one bundle per host, each with its own AK); exit 0 all verified, 1 not verified "
        "(every reason printed), 2 unreadable input",
    )  # fmt: skip
    q.add_argument("bundle", type=Path, nargs="+", help="the bundle(s) `attest quote` wrote")
    q.add_argument(
        "--ak", type=Path, required=True, action="append",
        help="each host's AK public key (PEM), one per bundle in their order",
    )  # fmt: skip
    q.add_argument(
        "--nonce", required=True, action="append",
        help="the nonce you sent: one for all bundles, or one per bundle",
    )  # fmt: skip
    q.add_argument(
        "--same-policy", action="store_true",
        help="also require every host to enforce the same policy (sha256)",
    )  # fmt: skip
    q.set_defaults(func=cmd_verify)
