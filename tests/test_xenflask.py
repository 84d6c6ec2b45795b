"""Xen's FLASK text as the daemon reads it (pure, `shyped.core.xenflask`): AVC lines of Xen's
console ring, ``xl list -Z``, and the plan for a domain's context. Hostile input included:
a guest's own console lines, garbage, overlong lines, bogus contexts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shyped.core.xenflask import (
    MAX_AVC_LINE,
    AvcRecord,
    ConsoleRead,
    Step,
    denial_summary,
    parse_avc_line,
    parse_list_z,
    plan_domain,
    plan_running_relabel,
    read_console,
    ring_gap,
)
from shyped.policy.flask import context, type_name

A = f"system_u:system_r:{type_name('bank-a-web')}"
B = f"system_u:system_r:{type_name('bank-b-web')}"
# As xen/xsm/flask/avc.c avc_audit prints it (two blanks after "avc:" and the verdict).
BIND = f"(XEN) avc:  denied  {{ bind }} for source=d1 target=d2 scontext={A} tcontext={B}_channel tclass=event"  # noqa: E501


def test_xens_own_denial_is_read_with_every_field() -> None:
    r = parse_avc_line(BIND)
    assert r == AvcRecord(
        denied=True, perms=("bind",), tclass="event", scontext=A, tcontext=f"{B}_channel",
        source=1, target=2,
    )  # fmt: skip
    assert r.details() == {
        "verdict": "denied", "perms": ["bind"], "tclass": "event", "scontext": A,
        "tcontext": f"{B}_channel", "source": 1, "target": 2,
    }  # fmt: skip


@pytest.mark.parametrize(
    "line",
    [
        "(XEN) [2026-12-07 00:31:07] avc:  denied  { map_read map_write } for source=d3 "
        f"target=d4 scontext={A} tcontext={B} tclass=grant",
        "(XEN) [   12.345678] avc:  denied  { send } for current=d0 scontext=system_u:system_r:"
        "dom0_t tcontext=system_u:system_r:dom0_t tclass=event",
        "(XEN) avc:  denied  { 0x40 } for current=d[IDLE] ssid=3 tsid=4 tclass=xen",
        "(XEN) avc:  granted  { setenforce } for current=d0 scontext=system_u:system_r:dom0_t "
        "tcontext=system_u:object_r:security_t tclass=security",
    ],
)
def test_xens_shapes_are_read(line: str) -> None:
    assert parse_avc_line(line) is not None


@pytest.mark.parametrize(
    "line",
    [
        BIND.replace("(XEN) ", "(d5) ", 1),  # a guest's console write: Xen prefixes it
        BIND.replace("(XEN) ", "", 1),  # dom0's kernel (unprefixed): not Xen's
        BIND.replace("(XEN) ", "(d5) (XEN) ", 1),
        "(XEN) " + BIND,
        BIND + " tclass=grant",  # a key twice
        BIND.replace("tclass=event", "tclass=event evil=1"),  # an unknown key
        BIND.replace("tclass=event", ""),  # no class
        BIND.replace(f"scontext={A}", "scontext=a:b"),  # not a context
        BIND.replace(f"scontext={A}", f"scontext={A}$(reboot)"),
        BIND.replace("source=d1", "source=dom1"),
        BIND.replace("source=d1", "source=d99999999"),
        BIND.replace("{ bind }", "{ }"),
        BIND.replace("{ bind }", "{ bi;nd }"),
        BIND.replace("{ bind }", "{ " + " ".join(["bind"] * 33) + " }"),
        BIND.replace("tclass=event", "tclass=" + "e" * 40),
        BIND + " " * MAX_AVC_LINE,  # longer than Xen's AVC buffer
        "",
        "\x00\xff garbage",
        "(XEN) avc:  denied  null for current=d0 tclass=event",
    ],
)
def test_anything_else_is_not_a_record(line: str) -> None:
    assert parse_avc_line(line) is None


@given(st.text(max_size=2000))
def test_random_text_never_raises_and_only_xens_prefix_counts(text: str) -> None:
    r = parse_avc_line(text)
    assert r is None or text.startswith("(XEN) ")


@given(st.lists(st.sampled_from([BIND, "(d1) " + BIND, "junk", "", "(XEN) x"]), max_size=30))
def test_console_reads_split_lines_anywhere(lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    want = sum(line == BIND for line in lines)
    for cut in (0, 7, len(text) // 2, len(text)):
        first = read_console("", text[:cut])
        second = read_console(first.rest, text[cut:])
        assert len(first.records) + len(second.records) == want
        assert second.rest == ""


def test_an_unfinished_line_past_the_bound_is_dropped() -> None:
    read = read_console("", "x" * (MAX_AVC_LINE + 1))
    assert read.rest == "" and read.records == ()
    assert read_console("", BIND[:20]).rest == BIND[:20]


def test_denials_are_summarised_by_a_closed_set_of_classes() -> None:
    bogus = parse_avc_line(BIND.replace("tclass=event", "tclass=made_up"))
    granted = parse_avc_line(BIND.replace("denied", "granted"))
    ok = parse_avc_line(BIND)
    assert bogus is not None and granted is not None and ok is not None
    assert denial_summary([ok, ok, bogus, granted]) == {"event": 2, "other": 1}


LIST_Z = f"""Name                                        ID   Mem VCPUs\tState\tTime(s)\tSecurity Label
Domain-0                                     0  1024     2     r-----      12.3 system_u:system_r:dom0_t
web a 1                                      3   128     1     --p---       0.0 {A}
plain                                        4   128     1     --p---       0.0 system_u:system_r:domU_t
nolabel                                      5   128     1     --p---       0.0 -
"""  # noqa: E501


def test_xl_list_z_is_read_from_the_right() -> None:
    rows = parse_list_z(LIST_Z)
    assert {d: r.context for d, r in rows.items()} == {
        0: "system_u:system_r:dom0_t", 3: A, 4: "system_u:system_r:domU_t", 5: None,
    }  # fmt: skip
    assert rows[3].name == "web a 1"


def test_xl_list_z_drops_a_domid_listed_twice_and_junk() -> None:
    text = LIST_Z + f"evil 3 1 1 --p--- 0.0 {B}\n" + "x" * 10000 + "\n42\n\x00\n"
    rows = parse_list_z(text)
    assert 3 not in rows and set(rows) == {0, 4, 5}


@given(st.text(max_size=3000))
def test_xl_list_z_never_raises_on_garbage(text: str) -> None:
    for row in parse_list_z(text).values():
        assert row.context is None or row.context.count(":") >= 2


@pytest.mark.parametrize(
    ("have", "step"),
    [
        (context("bank-a-web"), Step.NONE),
        (context(None), Step.RELABEL),
        ("system_u:system_r:domU_t", Step.RELABEL),
        ("system_u:system_r:dm_dom_t", Step.RELABEL),
        (context("bank-b-web"), Step.REFUSE),  # built under another label: never relabelled
        ("system_u:system_r:dom0_t", Step.REFUSE),
        ("evil_u:system_r:domU_t", Step.REFUSE),  # another FLASK user
        (None, Step.REFUSE),  # Xen lists no (readable) context
        ("not a context", Step.REFUSE),
    ],
)
def test_plan_relabels_only_from_unlabelled(have: str | None, step: Step) -> None:
    plan = plan_domain(context("bank-a-web"), have)
    assert plan.step is step
    assert plan.want == context("bank-a-web")


def test_an_unlabelled_domain_the_policy_admits_runs_unlabelled() -> None:
    assert plan_domain(context(None), "system_u:system_r:domU_t").step is Step.RELABEL
    assert plan_domain(context(None), context(None)).step is Step.NONE


def test_a_line_whose_head_was_dropped_is_not_read() -> None:
    first = read_console("", "x" * (MAX_AVC_LINE + 1))
    assert first.skipping
    second = read_console(first.rest, "y" + BIND + "\n" + BIND + "\n", skip=first.skipping)
    assert len(second.records) == 1 and not second.skipping
    # a read that starts where the ring cut a line: the tail and the last read's rest go
    assert read_console(BIND[:30], BIND + "\n", skip=True).records == ()
    assert read_console("", BIND, skip=True) == ConsoleRead((), 0, "", skipping=True)


def test_a_ring_read_that_did_not_start_where_asked_is_a_gap() -> None:
    assert not ring_gap(100, 150, 50)
    assert ring_gap(100, 16584, 16384)  # Xen started 100 bytes later
    assert not ring_gap(0xFFFFFFF0, 0x10, 0x20)  # the index wraps at 2**32


@pytest.mark.parametrize(
    ("have", "step", "why"),
    [
        (A, Step.RELABEL, "relabel from"),
        (B, Step.NONE, ""),  # Xen has the new label already (a relabel retried)
        (context("shop"), Step.REFUSE, "runs in Xen as"),  # Xen and shyped disagree already
        (context(None), Step.REFUSE, "runs in Xen as"),  # unlabelled in Xen, labelled here
        (None, Step.REFUSE, "no readable context"),
    ],
)
def test_a_running_relabel_goes_to_xen_only_from_the_old_labels_context(
    have: str | None, step: Step, why: str
) -> None:
    plan = plan_running_relabel(A, B, have)
    assert (plan.step, plan.want, plan.have) == (step, B, have) and why in plan.reason
