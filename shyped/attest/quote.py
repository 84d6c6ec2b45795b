"""The quote bundle and its offline verification (all but the signature check).

A bundle is what ``shypectl attest quote`` writes (docs/attestation.md)::

    {"format": "shyped-attest/2", "nonce": "...", "pcr": 13,
     "quote": {"message": "<base64 TPMS_ATTEST>", "signature": "<base64 TPMT_SIGNATURE>"},
     "log": ["<measurement log line>", ...],
     "state": {"policy": {...}, "mode": "...", "labels": {...}, "domains": [...],
               "audit_head": {...} | null}}

The TPM signs the quote's ``extraData``, which shyped sets to
``sha256("shyped-attest/2" 0x00 nonce 0x00 sha256(canonical state))``: the state report is
bound to the quote, and the nonce to both. The state's label store is checked against the last
``labels_sha256`` the log measured (measurement format 2, `shyped.attest.measure`).

Format 1 (``shyped-attest/1``, whole label stores in the log) is refused by name.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

import attrs

from shyped.attest.measure import (
    MAX_ENTRY_BYTES,
    MAX_EVENTS,
    Entry,
    LogError,
    LogFold,
    canonical,
    labels_digest,
    parse_line,
)

FORMAT: Final = "shyped-attest/2"
#: Formats this verifier no longer reads, and why (refused by name, never misread).
OLD_FORMATS: Final = {
    "shyped-attest/1": "its log measures whole label stores (measurement format 1)",
}
MAX_NONCE: Final = 256
#: Domains one host can run: domids 0..0x7FEF (Xen's DOMID_FIRST_RESERVED is 0x7FF0).
MAX_DOMAINS: Final = 0x7FF0
_TPM_GENERATED: Final = 0xFF544347
_ST_ATTEST_QUOTE: Final = 0x8018
_TPM_ALG_SHA256: Final = 0x000B


class BundleError(Exception):
    """A bundle that is not one (shape, encoding)."""


#: JSON values (objects, arrays, keys, strings, numbers, literals) a bundle may hold, counted
#: before it is parsed (`check_value_count`). A true bundle holds ~1 per log line and ~13 per
#: labelled domain: 300,000 log lines (a 60 MiB log) and 50,000 domains fit. Parsed, a value
#: costs ~50-100 bytes however short its JSON (``{}`` is 2 bytes, a dict 64): without this
#: bound a 64 MiB bundle of tiny objects took 1.7 GB in the verifier.
MAX_BUNDLE_VALUES: Final = 1_000_000
#: A JSON string, or a byte that separates or opens values. A string not closed runs to the
#: end (``\Z``) and any byte may follow a backslash (DOTALL): once a string's match has begun
#: it cannot fail, so the scan never restarts inside one -- with ``"`` as the only end, text
#: like ``"\"\"\"...`` made every quote a failed start scanning to the end (quadratic: 20 KB
#: took 18 s, 64 MiB would never end).
_TOKEN: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)|[,:{\[]', re.DOTALL)


def count_values(raw: bytes, limit: int) -> int:
    """How many JSON values `raw` holds at most (exact without empty containers), counted up
    to `limit` + 1 without building any: each value but the first follows a ``,`` or a ``:``
    or opens a container, and those bytes count only outside strings (which the scan steps
    over). One
    pass in C over the bytes, a Python step per string and separator, stopped past `limit`:
    constant memory (a regular expression's ``sub`` would keep a piece per string)."""
    n = 1
    for i, m in enumerate(_TOKEN.finditer(raw)):
        if m.end() - m.start() == 1:  # a separator: a string is at least 2 bytes
            n += 1
            if n > limit:
                break
        elif i > 2 * limit:  # strings without separators (not JSON): a value each, at least
            return limit + 1
    return n


def check_value_count(raw: bytes, limit: int = MAX_BUNDLE_VALUES) -> None:
    """`BundleError` if `raw` holds more than `limit` JSON values (`MAX_BUNDLE_VALUES`)."""
    if count_values(raw, limit) > limit:
        raise BundleError(
            f"more than {limit} JSON values, more than a bundle may hold (300,000 log lines "
            "and 50,000 labelled domains fit): refused before parsing"
        )


def check_nonce(nonce: str) -> str | None:
    """Why `nonce` cannot be used (None: it can)."""
    if not nonce or len(nonce.encode()) > MAX_NONCE:
        return f"the nonce must be 1 to {MAX_NONCE} bytes"
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in nonce):
        return "the nonce must not contain control characters"
    return None


def state_digest(state: Mapping[str, Any]) -> bytes:
    return hashlib.sha256(canonical(state)).digest()


def qualifying_data(nonce: str, state: Mapping[str, Any]) -> bytes:
    """The ``extraData`` the TPM signs for `nonce` and `state` (32 bytes)."""
    material = FORMAT.encode() + b"\0" + nonce.encode() + b"\0" + state_digest(state)
    return hashlib.sha256(material).digest()


@attrs.frozen
class Attest:
    """The fields of a TPMS_ATTEST (a quote) the verifier uses."""

    extra_data: bytes
    pcrs: tuple[tuple[int, int], ...]  #: (hash algorithm, PCR index) in selection order
    pcr_digest: bytes
    reset_count: int
    restart_count: int


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise BundleError("quote message: truncated TPMS_ATTEST")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u(self, fmt: str) -> int:
        (value,) = struct.unpack(">" + fmt, self.take(struct.calcsize(fmt)))
        return int(value)

    def sized(self) -> bytes:
        return self.take(self.u("H"))


def parse_attest(message: bytes) -> Attest:
    """Parse a TPM2 quote's TPMS_ATTEST (TPM 2.0 Part 2, 10.12.12)."""
    r = _Reader(message)
    if r.u("I") != _TPM_GENERATED:
        raise BundleError("quote message: not generated by a TPM (magic)")
    if r.u("H") != _ST_ATTEST_QUOTE:
        raise BundleError("quote message: not a quote")
    r.sized()  # qualifiedSigner
    extra = r.sized()
    r.u("Q")  # clock
    reset, restart = r.u("I"), r.u("I")
    r.u("B")  # safe
    r.u("Q")  # firmwareVersion
    pcrs: list[tuple[int, int]] = []
    for _ in range(r.u("I")):
        alg, size = r.u("H"), r.u("B")
        select = r.take(size)
        for byte_index, byte in enumerate(select):
            pcrs.extend((alg, byte_index * 8 + bit) for bit in range(8) if byte >> bit & 1)
    pcr_digest = r.sized()
    if r.pos != len(message):
        raise BundleError("quote message: trailing bytes after the quote")
    return Attest(extra, tuple(pcrs), pcr_digest, reset, restart)


class LogLines(Sequence[Entry]):
    """A bundle's measurement log as its lines, each parsed when it is read and not kept
    (a `BundleError` for a line that is not a measurement): the verifier walks it once
    (`verify_fields`), so only one parsed entry is alive at a time -- a line's values are
    not counted by `check_value_count` (it is a string there), and up to a million lines
    parsed at once took their weight many times over. A line longer than any measurement
    (`MAX_ENTRY_BYTES`) is refused before it is parsed."""

    def __init__(self, lines: Sequence[str]) -> None:
        self._lines = lines

    def __len__(self) -> int:
        return len(self._lines)

    def _parse(self, index: int) -> Entry:
        line = self._lines[index]
        if len(line) >= MAX_ENTRY_BYTES:  # str length: its UTF-8 bytes are at least as many
            raise BundleError(
                f"measurement log: line {index + 1}: {len(line)} characters, longer than any "
                f"measurement ({MAX_ENTRY_BYTES - 1})"
            )
        try:
            return parse_line(line, index + 1)
        except LogError as e:
            raise BundleError(f"measurement log: {e}") from None

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._parse(i) for i in range(*index.indices(len(self)))]
        return self._parse(range(len(self))[index])

    def __iter__(self) -> Iterator[Entry]:
        return (self._parse(i) for i in range(len(self)))


@attrs.frozen
class Bundle:
    nonce: str
    pcr: int
    message: bytes
    signature: bytes
    #: a `LogLines` for a parsed bundle (any sequence of entries will do)
    log: Sequence[Entry]
    state: Mapping[str, Any]


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise BundleError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise BundleError(f"{what} is not base64") from None


def parse_bundle(doc: Any) -> Bundle:
    if not isinstance(doc, dict):
        raise BundleError(f"not a {FORMAT} bundle")
    fmt = doc.get("format")
    if fmt in OLD_FORMATS:
        raise BundleError(
            f"bundle format {fmt} is no longer read ({OLD_FORMATS[fmt]}): this verifier reads "
            f"{FORMAT}; quote again from an upgraded shyped (after a reboot)"
        )
    if fmt != FORMAT:
        raise BundleError(f"not a {FORMAT} bundle (format {fmt!r} is unknown)")
    quote, log, state = doc.get("quote"), doc.get("log"), doc.get("state")
    nonce, pcr = doc.get("nonce"), doc.get("pcr")
    if not isinstance(quote, dict) or not isinstance(state, dict) or not isinstance(nonce, str):
        raise BundleError("a bundle needs quote and state objects and a nonce string")
    if not isinstance(pcr, int) or isinstance(pcr, bool) or not 0 <= pcr < 24:
        raise BundleError("pcr must be an index 0..23")
    if not isinstance(log, list) or not all(isinstance(x, str) for x in log):
        raise BundleError("log must be a list of lines")
    if len(log) > MAX_EVENTS:
        raise BundleError(f"measurement log: more than {MAX_EVENTS} events")
    return Bundle(
        nonce,
        pcr,
        _b64(quote.get("message"), "quote.message"),
        _b64(quote.get("signature"), "quote.signature"),
        LogLines([x for x in log if x.strip()]),
        state,
    )


def bundle_doc(
    nonce: str, pcr: int, message: bytes, signature: bytes, log: Sequence[bytes],
    state: Mapping[str, Any],
) -> dict[str, Any]:  # fmt: skip
    return {
        "format": FORMAT,
        "nonce": nonce,
        "pcr": pcr,
        "quote": {
            "message": base64.b64encode(message).decode(),
            "signature": base64.b64encode(signature).decode(),
        },
        "log": [line.decode().rstrip("\n") for line in log],
        "state": dict(state),
    }


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def encode_answer(doc: Mapping[str, Any], chunk: int = 256) -> bytes:
    """The control answer's ``result`` for bundle `doc`: ``{"bundle": doc}`` as compact ASCII
    JSON, its log encoded `chunk` lines per call: each call is short, so a thread encoding a
    large bundle leaves the reactor thread its turns between chunks (one ``json.dumps`` of the
    whole holds the GIL throughout)."""
    log = list(doc.get("log", ()))
    rest = _compact({k: v for k, v in doc.items() if k != "log"})
    parts = [b'{"bundle":', rest[:-1], b',"log":[' if len(rest) > 2 else b'"log":[']
    for i in range(0, len(log), chunk):
        parts.append((b"," if i else b"") + _compact(log[i : i + chunk])[1:-1])
    parts.append(b"]}}")
    return b"".join(parts)


@attrs.frozen
class Verdict:
    """What the verifier found: `problems` empty means everything below was verified."""

    problems: tuple[str, ...]
    pcr_value: bytes | None = None
    policy: Mapping[str, Any] | None = None
    mode: str | None = None
    domains: tuple[Mapping[str, Any], ...] = ()
    audit_head: Mapping[str, Any] | None = None
    unverified: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def _expected_label(labels: Mapping[str, Any], dom: Mapping[str, Any]) -> str | None:
    """The label the measured store (`LabelStore.to_json`'s document) assigns `dom`."""
    if dom.get("domid") == 0:
        dom0 = labels.get("dom0")
        return str(dom0) if isinstance(dom0, str) else None
    tables = labels.get("domains")
    if not isinstance(tables, dict):
        return None
    by_uuid, by_name = tables.get("uuid"), tables.get("name")
    uuid, name = dom.get("uuid"), dom.get("name")
    if isinstance(by_uuid, dict) and isinstance(uuid, str) and uuid.lower() in by_uuid:
        return str(by_uuid[uuid.lower()])
    if isinstance(by_name, dict) and isinstance(name, str) and name in by_name:
        return str(by_name[name])
    return None


def _bare(label: Any) -> str:
    text = str(label)
    return text.rsplit(":", 1)[-1]


def verify_fields(bundle: Bundle, expected_nonce: str) -> Verdict:
    """Every check but the signature's: the nonce and the state bound into the quote, the log
    (digests, order), its replay against the quoted PCR digest, and the reported state against
    the log's last events."""
    problems: list[str] = []
    try:
        attest = parse_attest(bundle.message)
    except BundleError as e:
        return Verdict((str(e),))
    want = qualifying_data(expected_nonce, bundle.state)
    if attest.extra_data != want:
        if bundle.nonce != expected_nonce and attest.extra_data == qualifying_data(
            bundle.nonce, bundle.state
        ):
            problems.append(
                f"nonce: the quote was made for nonce {bundle.nonce!r}, not {expected_nonce!r} "
                "(a replayed old quote)"
            )
        elif bundle.nonce == expected_nonce:
            problems.append(
                "state report: it is not the one the TPM signed (edited after the quote)"
            )
        else:
            problems.append(
                f"nonce: the quote is not for nonce {expected_nonce!r} nor for the state reported"
            )
    if attest.pcrs != ((_TPM_ALG_SHA256, bundle.pcr),):
        problems.append(f"quote: it covers {attest.pcrs}, not exactly sha256 PCR {bundle.pcr}")
    fold = LogFold()
    for entry in bundle.log:  # one pass, one parsed entry at a time (`LogLines`)
        fold.feed(entry)
    problems.extend(fold.problems)
    pcr = fold.pcr
    if hashlib.sha256(pcr).digest() != attest.pcr_digest:
        problems.append(
            f"measurement log: it replays to PCR {bundle.pcr} = {pcr.hex()}, which is not the "
            "value the TPM quoted (entries missing, added or edited)"
        )
    measured = fold.measured()
    state = bundle.state
    unverified: list[str] = []
    if measured.policy is None:
        problems.append("measurement log: no policy measured")
    elif state.get("policy") != measured.policy:
        problems.append(
            f"policy: reported {_show(state.get('policy'))}, the measured policy is "
            f"{_show(measured.policy)}"
        )
    if state.get("mode") != measured.mode:
        problems.append(f"mode: reported {state.get('mode')!r}, measured {measured.mode!r}")
    reported = state.get("labels")
    labels: Mapping[str, Any] = {}
    if not isinstance(reported, dict):
        problems.append("state report: labels must be the label store (an object)")
    elif measured.labels_sha256 is None:
        problems.append("measurement log: no label store measured")
    elif (got := labels_digest(reported)) != measured.labels_sha256:
        problems.append(
            f"label store: the reported store has sha256 {got}, the last measured store "
            f"{measured.labels_sha256} (edited, or not the store in force)"
        )
    else:
        labels = reported
    domains = state.get("domains")
    doms: list[Mapping[str, Any]] = []
    if not isinstance(domains, list):
        problems.append("state report: domains must be a list")
    elif len(domains) > MAX_DOMAINS:  # not kept: a verifier of many bundles keeps each verdict
        problems.append(
            f"state report: {len(domains)} domains, more than one Xen host runs "
            f"({MAX_DOMAINS} domids)"
        )
    else:
        for dom in domains:
            if not isinstance(dom, dict):
                problems.append("state report: a domain entry is not an object")
                continue
            doms.append(dom)
            want_label = _expected_label(labels, dom)
            who = f"domain {dom.get('name')!r} (domid {dom.get('domid')})"
            if want_label is None:
                unverified.append(f"{who}: label {dom.get('label')!r} not in the measured store")
            elif _bare(dom.get("label")) != _bare(want_label):
                problems.append(
                    f"{who}: reported label {dom.get('label')!r}, the measured label store "
                    f"assigns {want_label!r}"
                )
    rot = measured.audit_rotation
    head = state.get("audit_head")
    if isinstance(rot, Mapping) and isinstance(rot.get("head"), dict):
        rot_seq = rot["head"].get("seq")
        seq = head.get("seq") if isinstance(head, dict) else None
        if not isinstance(seq, int) or not isinstance(rot_seq, int) or seq < rot_seq:
            problems.append(
                f"audit chain: reported head {head!r} is older than the measured rotation at "
                f"seq {rot_seq!r}"
            )
    return Verdict(
        tuple(problems),
        pcr,
        measured.policy,
        measured.mode,
        tuple(doms),
        head if isinstance(head, dict) else None,
        tuple(unverified),
    )


def _show(policy: Any) -> str:
    if isinstance(policy, Mapping):
        return f"{policy.get('name')} {policy.get('version')} (sha256 {policy.get('sha256')})"
    return repr(policy)
