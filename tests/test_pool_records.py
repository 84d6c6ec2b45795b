"""Pool records read back from etcd (pure): bounds, the commit verdict, the audit anchor."""

from __future__ import annotations

import json

import pytest

from shyped.core.audit import Record
from shyped.pool import anchor as an
from shyped.pool import records as r

TEXT = '[policy]\nname = "p"\nversion = "1"\n'
PID = "0" * 32


def test_proposal_round_trip_and_a_wrong_hash_is_refused() -> None:
    p = r.Proposal(PID, r.sha256_text(TEXT), TEXT, "p.toml", "host-a", 0)
    assert r.parse_proposal(p.to_json()) == p
    forged = json.loads(p.to_json()) | {"text": TEXT + "# more\n"}
    with pytest.raises(r.RecordError, match="sha256"):
        r.parse_proposal(json.dumps(forged))
    with pytest.raises(r.RecordError, match="longer than"):
        r.parse_proposal(" " * (r.MAX_POLICY_TEXT + 70_000))


@pytest.mark.parametrize(
    "doc",
    [
        {"host": "h", "accept": 1, "problems": []},
        {"host": "h", "accept": True, "problems": [1]},
        {"host": "../h", "accept": True, "problems": []},
        {"host": "h", "accept": False, "problems": ["x"] * (r.MAX_PROBLEMS + 1)},
    ],
)
def test_answers_of_the_wrong_shape_are_refused(doc: dict[str, object]) -> None:
    with pytest.raises(r.RecordError):
        r.parse_answer(json.dumps(doc))


def test_commit_only_if_every_live_host_accepted() -> None:
    live = frozenset({"a", "b", "c"})
    yes = {h: r.Answer(h, True) for h in live}
    assert r.verdict(live, yes).commit
    no = yes | {"b": r.Answer("b", False, ("label x in use",))}
    v = r.verdict(live, no)
    assert not v.commit and v.reasons == {"b": ("label x in use",)}
    missing = {h: a for h, a in yes.items() if h != "c"}
    assert "no answer" in r.verdict(live, missing).reasons["c"][0]
    assert not r.verdict(frozenset(), {}).commit  # nobody live: nothing to commit to


def test_host_state_counts_must_be_counts() -> None:
    base = {"host": "h", "policy": {"sha256": "a" * 64}}
    assert r.parse_host_state(json.dumps(base | {"running_labels": {"web": 2}})).running_labels
    for bad in ({"web": "many"}, {"web": 0}, {"bad label": 1}, {"web": True}):
        with pytest.raises(r.RecordError):
            r.parse_host_state(json.dumps(base | {"running_labels": bad}))


def _rec(log: str, seq: int, h: str) -> Record:
    return Record(log, seq, "t", "k", "0" * 64, h, {}, b"")


def test_anchor_check_finds_a_rewritten_cut_or_replaced_log() -> None:
    log = "ab" * 16
    a = an.AuditAnchor("h", log, 1, "cd" * 32, 1.0)
    assert an.parse_anchor(a.to_json()) == a
    good = [_rec(log, 0, "11" * 32), _rec(log, 1, "cd" * 32), _rec(log, 2, "22" * 32)]
    assert an.check_anchor(good, a) == ()
    rewritten = [good[0], _rec(log, 1, "ee" * 32)]
    assert "rewritten" in an.check_anchor(rewritten, a)[0]
    assert "cut" in an.check_anchor(good[:1], a)[0]
    assert "replaced" in an.check_anchor([_rec("ff" * 16, 1, "cd" * 32)], a)[0]
    with pytest.raises(an.AnchorError):
        an.parse_anchor(json.dumps({"host": "h", "log": "x", "seq": 1, "hash": "y", "time": 1}))
