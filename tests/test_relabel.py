"""The relabel checks (pure): Chinese Wall against the others, live channels and resources under
the new label, every reason reported; resources in use keep only labels their users may use."""

from __future__ import annotations

from pathlib import Path

import pytest

from shyped.core.relabel import RelabelCheck, check_domain_relabel, check_resource_relabel
from shyped.policy import toml_format
from shyped.policy.decisions import PolicyEngine
from shyped.policy.update import (
    LiveChannel,
    Reason,
    ResourceInUse,
    RunningDomain,
    RunningSystem,
)

HOSTING = Path(__file__).resolve().parents[1] / "conf" / "policies" / "hosting.toml"


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine(toml_format.loads(HOSTING.read_text(), file=str(HOSTING)))


def bank_host(*extra: RunningDomain) -> RunningSystem:
    """dom0; web-a1 (1) with a vif on xenbr-bank-a and its disk; batch-a1 (2) with a vchan
    to web-a1 and the archive read-only; shop-1 (3) with its disk."""
    return RunningSystem(
        domains=(
            RunningDomain(0, "dom0", "Domain-0"),
            RunningDomain(1, "bank-a-web", "web-a1"),
            RunningDomain(2, "bank-a-batch", "batch-a1"),
            RunningDomain(3, "shop", "shop-1"),
            *extra,
        ),
        channels=(
            LiveChannel(1, 0, "vif"),
            LiveChannel(1, 0, "vbd"),
            LiveChannel(2, 1, "vchan"),
            LiveChannel(3, 0, "vbd"),
        ),
        resources=(
            ResourceInUse(1, "xenbr-bank-a", True, "bridge:xenbr-bank-a"),
            ResourceInUse(1, "bank-a-disk", True, "disk:/srv/xen/images/web-a1.img"),
            ResourceInUse(2, "bank-a-archive", False, "disk:/srv/xen/images/archive-a.img"),
            ResourceInUse(3, "shop-disk", True, "disk:/srv/xen/images/shop-1.img"),
        ),
    )


def reasons(check: RelabelCheck) -> list[Reason]:
    return [p.reason for p in check.problems]


def test_a_label_with_the_same_types_and_level_is_allowed(engine: PolicyEngine) -> None:
    check = check_domain_relabel(engine, bank_host(), 1, "bank-a-batch")
    assert check.allowed, check.reasons
    assert (check.old, check.new) == ("bank-a-web", "bank-a-batch")
    assert check_domain_relabel(engine, bank_host(), 1, "ACM:example.hosting:bank-a-web").allowed


def test_a_chinese_wall_conflict_with_another_running_domain_is_refused(
    engine: PolicyEngine,
) -> None:
    check = check_domain_relabel(engine, bank_host(), 3, "bank-b-web")
    assert Reason.CHINESE_WALL in reasons(check)
    cw = next(p for p in check.problems if p.reason is Reason.CHINESE_WALL)
    assert "'bank-b'" in cw.message and "'bank-a'" in cw.message and "shop-1" in cw.message
    # its disk (web type, public) is also lost to bank-b-web: every reason is reported
    assert Reason.RESOURCE in reasons(check)


def test_the_domains_own_old_label_does_not_count_against_it(engine: PolicyEngine) -> None:
    alone = RunningSystem(
        domains=(RunningDomain(0, "dom0"), RunningDomain(5, "bank-a-web", "solo")),
    )
    assert check_domain_relabel(engine, alone, 5, "bank-b-web").allowed
    # ... but another domain with the old label does
    pair = RunningSystem(
        domains=(*alone.domains, RunningDomain(6, "bank-a-web", "twin")),
    )
    assert reasons(check_domain_relabel(engine, pair, 5, "bank-b-web")) == [Reason.CHINESE_WALL]


def test_live_channels_and_resources_are_checked_under_the_new_label(
    engine: PolicyEngine,
) -> None:
    # bank-a-reports is bank-a but "internal": MLS denies the read-write disk (confidential)
    # and the vchan with batch-a1 (confidential, a two-way channel needs equal levels).
    check = check_domain_relabel(engine, bank_host(), 1, "bank-a-reports")
    assert sorted(reasons(check)) == sorted([Reason.CHANNEL, Reason.RESOURCE])
    channel = next(p for p in check.problems if p.reason is Reason.CHANNEL)
    assert "vchan" in channel.message and "[mls]" in channel.message
    assert channel.domains == (2, 1)
    resource = next(p for p in check.problems if p.reason is Reason.RESOURCE)
    assert "web-a1.img" in resource.message
    # the vif to dom0 and the bridge stay fine (dom0 is MLS-exempt, bridges carry no level)
    assert len(check.problems) == 2


def test_unknown_labels_and_domains_that_do_not_run_are_refused(engine: PolicyEngine) -> None:
    assert reasons(check_domain_relabel(engine, bank_host(), 1, "no-such")) == [Reason.LABEL]
    assert reasons(check_domain_relabel(engine, bank_host(), 1, "ACM:other:shop")) == [Reason.LABEL]
    gone = check_domain_relabel(engine, bank_host(), 42, "shop")
    assert reasons(gone) == [Reason.LABEL] and "not running" in gone.reasons[0]


def test_a_resource_in_use_keeps_only_labels_its_users_may_use(engine: PolicyEngine) -> None:
    host = bank_host()
    bridge = "bridge:xenbr-bank-a"
    refused = check_resource_relabel(engine, host, bridge, "xenbr-bank-b")
    assert reasons(refused) == [Reason.RESOURCE] and "web-a1" in refused.reasons[0]
    assert refused.old == "xenbr-bank-a"
    # unlabelling it falls to the policy's default: deny
    assert reasons(check_resource_relabel(engine, host, bridge, None)) == [Reason.RESOURCE]
    # the archive is used read-only by a confidential domain: another bank-a label it may
    # read is fine
    archive = "disk:/srv/xen/images/archive-a.img"
    assert check_resource_relabel(engine, host, archive, "bank-a-disk").allowed
    # a resource nobody uses takes any label
    unused = check_resource_relabel(engine, host, "bridge:xenbr-bank-b", "shop-disk")
    assert unused.allowed and unused.old is None
