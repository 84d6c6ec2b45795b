"""The daemon's life: startup reconcile (nothing escapes while it was down), policy reload
(allowed switches, refused ones keep the old policy), status."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from daemon_helpers import HOSTING, POLICY, Harness, domcfg, host_fixture, image

__all__ = ["host_fixture"]  # the `host` fixture


@pytest_twisted.ensureDeferred
async def test_everything_created_before_the_daemon_started_is_decided_at_start(
    host: Harness,
) -> None:
    ts = host.ts
    a = ts.create(domcfg("web-a1", vifs=["bridge=xenbr-bank-b"], disks=[image("web-a1")]))
    b = ts.create(domcfg("web-b1"))
    s = ts.create(domcfg("shop-1"), paused=False)
    good = ts.vchan_listen(0, a)
    bad = ts.vchan_listen(a, s)
    daemon = await host.start()
    await host.settle()
    assert host.last(f"domain {a}").allowed
    assert host.last(f"domain {s}").allowed
    assert not host.last(f"domain {b}").allowed  # replayed in domid order: web-a1 came first
    assert "web-b1" not in host.domains()
    assert not host.last(f"device vif {a}/0").allowed
    assert not host.exists(f"/libxl/{a}/device/vif/0")
    assert host.last(f"device vbd {a}/51712").allowed
    assert host.last(f"vchan {good.path}").allowed and host.exists(good.path)
    assert not host.last(f"vchan {bad.path}").allowed and not host.exists(bad.path)
    assert host.read(f"/local/domain/{s}/shyped/label") == f"ACM:{POLICY}:shop"
    status = daemon.status()
    assert status.reconciles == 1
    assert status.domains == {"admitted": 3}  # dom0, web-a1, shop-1
    # web-b1, the vif, the bad vchan, and web-b1's console: a denied domain is party to
    # nothing (rule denied-domain, issue 20 #4)
    assert status.decisions["deny"] == 4
    assert not host.last(f"device console {b}/0").allowed


@pytest_twisted.ensureDeferred
async def test_a_restarted_daemon_decides_what_happened_while_it_was_down(
    host: Harness,
) -> None:
    await host.start()
    a = await host.call(host.ts.create, domcfg("web-a1"))
    await host.settle()
    await host.stop()
    # Down: a conflicting domain and a bad disk appear, a good domain goes away.
    b = host.ts.create(domcfg("web-b1"))
    s = host.ts.create(domcfg("shop-1", disks=[image("web-a1")]))
    host.outcomes.clear()
    daemon = await host.start()
    await host.settle()
    assert host.last(f"domain {a}").allowed
    assert not host.last(f"domain {b}").allowed and "web-b1" not in host.domains()
    assert host.last(f"domain {s}").allowed
    assert not host.last(f"device vbd {s}/51712").allowed
    assert not host.exists(f"/libxl/{s}/device/vbd/51712")
    assert daemon.engine.running.running_labels() == {"dom0": 1, "bank-a-web": 1, "shop": 1}


def policy_variant(tmp_path: Path, name: str, *edits: tuple[str, str]) -> Path:
    text = HOSTING.read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / name
    path.write_text(text)
    return path


UPDATE_HEADER = (
    'version = "1.0"\nbootstrap = "dom0"\n',
    'version = "1.1"\nbootstrap = "dom0"\nfrom = { name = "example.hosting", version = "1.0" }\n',
)


@pytest_twisted.ensureDeferred
async def test_an_allowed_update_switches_and_relabels_renamed_domains(
    host: Harness, tmp_path: Path
) -> None:
    daemon = await host.start()
    s = await host.call(host.ts.create, domcfg("shop-1", disks=[image("shop-1")]))
    await host.settle()
    new = policy_variant(
        tmp_path,
        "hosting-1.1.toml",
        UPDATE_HEADER,
        ('name = "shop"\n', 'name = "web-shop"\nfrom = "shop"\n'),
    )
    result = await daemon.reload_policy(new)
    assert result.applied, str(result)
    await host.settle()
    assert daemon.status().policy_version == "1.1"
    assert host.read(f"/local/domain/{s}/shyped/label") == f"ACM:{POLICY}:web-shop"
    redone = host.last(f"domain {s}")
    assert redone.allowed and redone.label == "web-shop"
    assert host.last(f"device vbd {s}/51712").allowed
    assert daemon.engine.running.running_labels() == {"dom0": 1, "web-shop": 1}


@pytest_twisted.ensureDeferred
async def test_a_refused_update_keeps_the_old_policy_and_says_every_reason(
    host: Harness, tmp_path: Path
) -> None:
    daemon = await host.start()
    a = await host.call(host.ts.create, domcfg("web-a1"))
    s = await host.call(host.ts.create, domcfg("shop-1"))
    await host.call(host.ts.create, domcfg("batch-a1"))
    await host.settle()
    sha = daemon.status().policy_sha256
    bad = policy_variant(
        tmp_path,
        "hosting-bad.toml",
        UPDATE_HEADER,
        # bank-a-web is deleted while web-a1 runs, and shop now conflicts with bank-a-batch.
        ('name = "bank-a-web"\nste = ["bank-a"]', 'name = "gone"\nste = ["bank-a"]'),
        ('types = ["bank-a", "bank-b"]', 'types = ["bank-a", "bank-b", "public"]'),
    )
    host.outcomes.clear()
    result = await daemon.reload_policy(bad)
    assert not result.applied
    text = "\n".join(result.problems)
    assert "[label]" in text and "bank-a-web" in text
    assert "[chinese-wall]" in text and "'bank-a-batch'" in text and "'shop'" in text
    assert daemon.status().policy_sha256 == sha
    assert host.outcomes == []  # nothing re-decided
    assert {"web-a1", "shop-1"} <= set(host.domains())
    assert host.read(f"/local/domain/{a}/shyped/label") == f"ACM:{POLICY}:bank-a-web"
    assert host.read(f"/local/domain/{s}/shyped/label") == f"ACM:{POLICY}:shop"


@pytest_twisted.ensureDeferred
async def test_reload_errors_and_unchanged_policies_change_nothing(
    host: Harness, tmp_path: Path
) -> None:
    daemon = await host.start()
    broken = tmp_path / "broken.toml"
    broken.write_text("[policy]\nname = 3\n")
    result = await daemon.reload_policy(broken)
    assert not result.applied and result.error is not None
    assert str(broken) in result.error
    same = await daemon.reload_policy()
    assert not same.applied and same.problems == ("the policy is unchanged",)
    missing = await daemon.reload_policy(tmp_path / "nope.toml")
    assert not missing.applied and "cannot read" in (missing.error or "")
    assert daemon.status().policy_name == POLICY
