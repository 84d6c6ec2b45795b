"""Placement (pure) honours ``max_domains``: a host already running a label's quota of domains
is excluded with the quota as the reason, one below it is admitted (before, placement asked the
Chinese Wall only and named a full host as a place)."""

from __future__ import annotations

from pathlib import Path

from shyped.policy.decisions import PolicyEngine
from shyped.policy.toml_format import load
from shyped.pool.placement import place, quota_full
from shyped.pool.records import HostState

HOSTING = Path(__file__).parent.parent / "conf" / "policies" / "hosting.toml"
ENGINE = PolicyEngine(load(HOSTING))  # bank-a-web: max_domains = 4; shop: no quota
SHA = "0" * 64


def test_placement_excludes_a_host_at_the_labels_max_domains() -> None:
    hosts = [
        HostState("host-a", {"bank-a-web": 4}, SHA),
        HostState("host-b", {"bank-a-web": 3}, SHA),
        HostState("host-c", {"shop": 40}, SHA),
    ]
    verdicts = {v.host: v for v in place(ENGINE, SHA, "bank-a-web", hosts)}
    assert not verdicts["host-a"].admitted
    assert verdicts["host-a"].reason == ("quota of bank-a-web: max_domains = 4 and 4 run there")
    assert verdicts["host-b"].admitted and verdicts["host-c"].admitted
    # A label without a quota is never full; the ACM form of a label counts as its name.
    assert quota_full(ENGINE, "shop", {"shop": 10_000}) is None
    assert quota_full(ENGINE, "ACM:example.hosting:bank-a-web", {"bank-a-web": 4}) is not None
    assert quota_full(ENGINE, "no-such-label", {}) is None  # the wall check refuses it
