"""The pure attestation core (`shyped.attest`): measurement events and their log, the replay,
the TPMS_ATTEST parser and the verifier's field checks; and the ``[attestation]`` table."""

from __future__ import annotations

import hashlib
import re
import struct

import pytest

from shyped.attest import measure, quote
from shyped.service.config import ConfigError, parse_config

POLICY = {"name": "p", "version": "1.0", "sha256": "aa" * 32}
LABELS = {"version": 1, "domains": {"uuid": {}, "name": {"web": "bank-a-web"}}, "resources": {}}


def entries(*events: dict) -> list[measure.Entry]:  # type: ignore[type-arg]
    return [measure.make_entry(i, e) for i, e in enumerate(events)]


def start() -> dict:  # type: ignore[type-arg]
    return {"kind": "start", "policy": POLICY, "mode": "enforcing",
            "labels_sha256": measure.labels_digest(LABELS)}  # fmt: skip


def test_extend_and_replay_are_the_tpm_s() -> None:
    d = hashlib.sha256(b"x").digest()
    # the value swtpm gave for `tpm2_pcrextend 16:sha256=sha256("x")` from reset
    assert measure.extend(bytes(32), d).hex() == (
        "7f85193790de75e46b70bfec3614098f47332a6993dabac6e38ad35f47df5da4"
    )
    log = entries(start(), {"kind": "mode", "mode": "permissive"})
    assert measure.replay(log) == measure.extend(measure.extend(bytes(32), log[0].digest),
                                                 log[1].digest)  # fmt: skip


def test_log_lines_round_trip_and_bad_lines_are_named() -> None:
    log = entries(start())
    back = measure.parse_log([e.line() for e in log])
    assert back == log and measure.check_entries(back) == []
    with pytest.raises(measure.LogError, match="line 1: not JSON"):
        measure.parse_log([b"{"])
    with pytest.raises(measure.LogError, match="line 2: digest must be 64 hex digits"):
        measure.parse_log([log[0].line(), b'{"seq": 1, "digest": "zz", "event": {}}'])


def test_check_entries_names_gaps_edits_and_a_missing_start() -> None:
    log = entries(start(), {"kind": "mode", "mode": "permissive"})
    edited_event = {"v": 2, "kind": "mode", "mode": "enforcing"}
    edited = [log[0], measure.Entry(1, edited_event, log[1].digest)]
    assert measure.check_entries(edited) == [
        "log entry 1 ('mode'): its digest does not match its event (the entry was edited)"
    ]
    assert "seq 1, expected 0" in measure.check_entries(log[1:])[0]
    assert "log entry 0 is not a start event" in measure.check_entries(log[1:])


def test_events_for_measures_only_what_changed() -> None:
    digest = measure.labels_digest(LABELS)
    first = measure.events_for(None, policy=POLICY, mode="enforcing", labels=digest,
                               rotations=0, audit_head=None)  # fmt: skip
    assert [e["kind"] for e in first] == ["start"]
    m = measure.measured_state(entries(*first))
    same = measure.events_for(m, policy=POLICY, mode="enforcing", labels=digest, rotations=0,
                              audit_head=None)  # fmt: skip
    assert same == []
    new_policy = {**POLICY, "sha256": "bb" * 32}
    empty = measure.labels_digest({})
    changed = measure.events_for(m, policy=new_policy, mode="permissive", labels=empty,
                                 rotations=2, audit_head={"seq": 9, "hash": "h"})  # fmt: skip
    assert [e["kind"] for e in changed] == ["policy", "labels", "mode", "audit-rotation"]
    m2 = measure.measured_state(entries(*first, *changed))
    assert m2.policy == new_policy and m2.mode == "permissive" and m2.labels_sha256 == empty
    # a later start counts rotations afresh
    assert measure.measured_state(entries(*first, *changed, start())).audit_rotation is None


def attest_message(extra: bytes, pcr: int, pcr_digest: bytes) -> bytes:
    select = bytearray(3)
    select[pcr // 8] |= 1 << (pcr % 8)
    return (
        struct.pack(">IH", 0xFF544347, 0x8018)
        + struct.pack(">H", 2) + b"\x00\x0b"
        + struct.pack(">H", len(extra)) + extra
        + struct.pack(">QIIB", 1, 2, 3, 1) + struct.pack(">Q", 7)
        + struct.pack(">IHB", 1, 0x000B, 3) + bytes(select)
        + struct.pack(">H", len(pcr_digest)) + pcr_digest
    )  # fmt: skip


def bundle_for(
    nonce: str,
    log: list[measure.Entry],
    state: dict,
    *,
    signed_nonce: str | None = None,  # type: ignore[type-arg]
    signed_state: dict | None = None,
) -> quote.Bundle:  # type: ignore[type-arg]
    extra = quote.qualifying_data(signed_nonce or nonce, signed_state or state)
    msg = attest_message(extra, 13, hashlib.sha256(measure.replay(log)).digest())
    return quote.Bundle(signed_nonce or nonce, 13, msg, b"", tuple(log), state)


def good_state() -> dict:  # type: ignore[type-arg]
    web = {"domid": 3, "name": "web", "uuid": None, "label": "bank-a-web"}
    return {"policy": POLICY, "mode": "enforcing", "labels": LABELS, "audit_head": None,
            "domains": [web]}  # fmt: skip


def test_parse_attest_reads_the_quote_fields() -> None:
    a = quote.parse_attest(attest_message(b"\x01" * 32, 13, b"\x02" * 32))
    assert a.extra_data == b"\x01" * 32 and a.pcrs == ((0x000B, 13),)
    assert a.pcr_digest == b"\x02" * 32 and (a.reset_count, a.restart_count) == (2, 3)
    with pytest.raises(quote.BundleError, match="truncated"):
        quote.parse_attest(attest_message(b"", 13, b"\x02" * 32)[:-3])
    with pytest.raises(quote.BundleError, match="magic"):
        quote.parse_attest(b"\x00" * 40)


def test_verify_fields_accepts_the_truth_and_names_each_lie() -> None:
    log = entries(start())
    assert quote.verify_fields(bundle_for("n", log, good_state()), "n").ok

    v = quote.verify_fields(bundle_for("n", log, good_state(), signed_nonce="old"), "n")
    assert v.problems == ("nonce: the quote was made for nonce 'old', not 'n' (a replayed old "
                          "quote)",)  # fmt: skip

    lie = good_state()
    lie["domains"][0]["label"] = "bank-b-web"
    v = quote.verify_fields(bundle_for("n", log, lie, signed_state=good_state()), "n")
    assert "state report: it is not the one the TPM signed (edited after the quote)" in v.problems
    assert any("reported label 'bank-b-web'" in p for p in v.problems)

    other_policy = {**good_state(), "policy": {**POLICY, "sha256": "cc" * 32}}
    v = quote.verify_fields(bundle_for("n", log, other_policy), "n")
    assert len(v.problems) == 1 and v.problems[0].startswith("policy: reported p 1.0 (sha256 cc")

    short = bundle_for("n", log, good_state())
    longer = entries(start(), {"kind": "mode", "mode": "permissive"})
    v = quote.verify_fields(quote.Bundle("n", 13, short.message, b"", tuple(longer),
                                         {**good_state(), "mode": "permissive"}), "n")  # fmt: skip
    assert any("which is not the value the TPM quoted" in p for p in v.problems)


def test_nonce_and_bundle_shape_are_checked() -> None:
    assert quote.check_nonce("") and quote.check_nonce("a\nb") and quote.check_nonce("x" * 257)
    assert quote.check_nonce("fresh-1") is None
    with pytest.raises(quote.BundleError, match="not a shyped-attest/2 bundle"):
        quote.parse_bundle({"format": "x"})
    doc = quote.bundle_doc("n", 13, b"m", b"s", [e.line() for e in entries(start())], {})
    assert quote.parse_bundle(doc).log[0].event["kind"] == "start"
    doc["quote"]["message"] = "%%%"
    with pytest.raises(quote.BundleError, match=r"quote\.message is not base64"):
        quote.parse_bundle(doc)


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ("pcr = 16", "attestation.pcr must be one of 8..15"),
        ("pcr = 23", "attestation.pcr must be one of 8..15"),
        ('ak_handle = "0x81800000"', "attestation.ak_handle must be a persistent owner handle"),
        ('ak_handle = "zz"', "attestation.ak_handle must be a persistent owner handle"),
        ("enable = true", "unknown key 'enable' in [attestation] (did you mean 'enabled'?"),
        ('tcti = ""', "attestation.tcti must name a TCTI"),
        ("quotes_per_minute = 0", "attestation.quotes_per_minute"),
        ("quote_burst = 0", "attestation.quote_burst"),
    ],
)
def test_attestation_table_is_checked(table: str, error: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(error)):
        parse_config(f'[policy]\npath = "p.toml"\n[attestation]\n{table}\n')


def test_attestation_is_off_by_default_and_configurable() -> None:
    assert not parse_config('[policy]\npath = "p.toml"\n').attestation.enabled
    text = ('[policy]\npath = "/p.toml"\n[attestation]\nenabled = true\npcr = 14\n'
            'ak_handle = "0x81010002"\ntcti = "swtpm:port=2321"\nquotes_per_minute = 60\n'
            'quote_burst = 5\n')  # fmt: skip
    c = parse_config(text).attestation
    assert (c.enabled, c.pcr, c.ak_handle, c.tcti) == (True, 14, 0x81010002, "swtpm:port=2321")
    assert (c.quotes_per_minute, c.quote_burst) == (60, 5)


def test_entries_are_small_whatever_the_label_store_and_bounded() -> None:
    """Format 2 measures the store's digest: an entry for 2,000 labelled domains is as small
    as for one; an event that would not fit `MAX_ENTRY_BYTES` is refused (fail closed)."""
    names = {f"guest-{i:05d}": "bank-a-web" for i in range(2000)}
    big = {"version": 1, "resources": {}, "domains": {"uuid": {}, "name": names}}
    e = measure.make_entry(7, {"kind": "labels", "labels_sha256": measure.labels_digest(big)})
    one = measure.make_entry(7, {"kind": "labels", "labels_sha256": measure.labels_digest(LABELS)})
    assert len(e.line()) == len(one.line()) <= 256 and e.event["v"] == 2
    with pytest.raises(ValueError, match="more than 1024"):
        measure.make_entry(0, {"kind": "policy", "policy": {"name": "x" * 2000}})


def test_old_and_unknown_formats_are_refused_by_name() -> None:
    v1 = measure.Entry(0, {"kind": "start", "policy": POLICY, "mode": "enforcing",
                           "labels": LABELS}, b"")  # fmt: skip
    v1 = measure.Entry(0, v1.event, measure.digest(v1.event))
    (problem,) = measure.check_entries([v1])
    assert problem.startswith("log entry 0: measurement format 1 (no 'v': whole label stores")
    v9 = measure.Entry(0, {**v1.event, "v": 9}, measure.digest({**v1.event, "v": 9}))
    assert "unknown measurement format 9" in measure.check_entries([v9])[0]
    assert measure.log_versions([v1]) == problem and measure.log_versions(entries(start())) is None
    with pytest.raises(quote.BundleError, match="bundle format shyped-attest/1 is no longer read"):
        quote.parse_bundle({"format": "shyped-attest/1"})


def test_the_reported_label_store_must_be_the_last_measured_one() -> None:
    """The state report carries the whole store; the log only its digest: a reported store
    that is not the measured one is named with both digests."""
    log = entries(start())
    lie = good_state()
    lie["labels"] = {**LABELS, "domains": {"uuid": {}, "name": {"web": "bank-b-web"}}}
    lie["domains"][0]["label"] = "bank-b-web"
    v = quote.verify_fields(bundle_for("n", log, lie), "n")  # signed as reported: only the log
    assert v.problems == (
        f"label store: the reported store has sha256 {measure.labels_digest(lie['labels'])}, the "
        f"last measured store {measure.labels_digest(LABELS)} (edited, or not the store in "
        "force)",
    )
    assert v.unverified  # no label is vouched for by an unmeasured store


def test_a_state_report_with_more_domains_than_xen_runs_is_refused_not_kept() -> None:
    """A hostile bundle's domain list is kept in the verdict (printed, and kept per host when
    many bundles are checked): more than Xen's domids is a problem, and none is kept."""
    state = good_state()
    n = 0x7FF0 + 1  # Xen's DOMID_FIRST_RESERVED, and one more
    state["domains"] = [{}] * n
    v = quote.verify_fields(bundle_for("n", entries(start()), state), "n")
    assert f"state report: {n} domains, more than one Xen host runs" in " ".join(v.problems)
    assert v.domains == ()
