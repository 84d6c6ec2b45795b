"""The label store through policy updates and reloads, failing closed: assignments of labels an
update deletes are marked ``INV_ACM:<old policy>:<label>`` (domains as resources, as ACM marked
them), so a later policy reusing the name does not take them over; dom0's stored label must be
a label of the policy (start and a store reload refuse otherwise); an update deleting it is
refused like any running domain's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest_twisted
from daemon_helpers import HOSTING, LABELS, POLICY, Harness, domcfg, host_fixture
from test_daemon_lifecycle import UPDATE_HEADER, policy_variant

from shyped.core.labelstore import LabelStore, load_label_store, parse_label_store

host = host_fixture
ROOT = Path(__file__).resolve().parents[1]


def test_an_update_marks_domain_assignments_of_deleted_labels_invalid() -> None:
    store = (
        LabelStore()
        .with_domain(name="shop-1", label="shop")
        .with_domain(uuid="6f1b1c9e-2a4d-4c55-9e0e-000000000001", label="shop")
        .with_domain(name="web-a1", label="bank-a-web")
        .with_resource("/srv/a.img", "shop-disk")
    )
    after = store.after_update(
        old_policy="p", vm={"bank-a-web": "bank-a-front"}, resource={"shop-disk": "shop-disk"}
    )
    assert after.by_name == {"shop-1": "INV_ACM:p:shop", "web-a1": "bank-a-front"}
    assert after.by_uuid == {"6f1b1c9e-2a4d-4c55-9e0e-000000000001": "INV_ACM:p:shop"}
    assert after.invalidated() == [
        "domain uuid '6f1b1c9e-2a4d-4c55-9e0e-000000000001': INV_ACM:p:shop",
        "domain name 'shop-1': INV_ACM:p:shop",
    ]
    again = after.after_update(old_policy="q", vm={}, resource={})
    assert again.by_name["shop-1"] == "INV_ACM:p:shop"  # keeps the policy that deleted it
    assert parse_label_store(after.to_json()) == after  # the store file keeps the marks


@pytest_twisted.ensureDeferred
async def test_a_deleted_label_reused_by_a_later_policy_does_not_take_its_domains_over(
    host: Harness, tmp_path: Path
) -> None:
    """1.1 deletes 'shop' (no shop runs); 1.2 brings back a label called 'shop' that means
    something else (bank A's types). shop-1, assigned to the old 'shop', stays denied."""
    daemon = await host.start()
    v11 = policy_variant(
        tmp_path, "hosting-1.1.toml", UPDATE_HEADER, ('name = "shop"\n', 'name = "storefront"\n')
    )
    assert (await daemon.reload_policy(v11)).applied
    store = json.loads(Path(daemon.config.labels).read_text())
    assert store["domains"]["name"]["shop-1"] == f"INV_ACM:{POLICY}:shop"
    v12 = tmp_path / "hosting-1.2.toml"
    v12.write_text(
        v11.read_text()
        .replace('version = "1.1"', 'version = "1.2"')
        .replace('version = "1.0" }', 'version = "1.1" }')
        + '\n[[label]]\nname = "shop"\nste = ["bank-a"]\ncw = ["bank-a"]\n'
    )
    result = await daemon.reload_policy(v12)
    assert result.applied, str(result)
    d = await host.call(host.ts.create, domcfg("shop-1"))
    await host.settle()
    out = host.last(f"domain {d}")
    assert not out.allowed, out.decision
    assert "INV_ACM" in out.decision.reason


def _config(tmp_path: Path, socket: Path, labels: dict[str, object]) -> Path:
    store = tmp_path / "labels.json"
    doc = json.loads(LABELS.read_text())
    doc.update(labels)
    store.write_text(json.dumps(doc))
    config = tmp_path / "shyped.toml"
    config.write_text(
        f'[policy]\npath = "{HOSTING}"\nlabels = "{store}"\n'
        f'[xenstore]\nsocket = "{socket}"\n[actuator]\nkind = "sandbox"\n'
    )
    return config


def test_start_refuses_a_stored_dom0_label_the_policy_lacks(tmp_path: Path) -> None:
    config = _config(tmp_path, tmp_path / "no-xenstored", {"dom0": "mgt"})
    for command in (("check",), ()):
        r = subprocess.run(
            [sys.executable, "-m", "shyped.cli.main", "--config", str(config), *command],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert r.returncode == 2, r.stderr
        assert "dom0's label 'mgt' is not a VM label of policy 'example.hosting'" in r.stderr
        assert "cannot reach xenstored" not in r.stderr and "Traceback" not in r.stderr


@pytest_twisted.ensureDeferred
async def test_a_store_reload_with_dom0_on_a_label_the_policy_lacks_keeps_the_store(
    host: Harness,
) -> None:
    daemon = await host.start()
    path = Path(daemon.config.labels)
    doc = json.loads(path.read_text())
    doc["dom0"] = "mgt"
    doc["domains"]["name"]["new-1"] = "shop"  # the rest of the edit is not taken either
    path.write_text(json.dumps(doc))
    result = await daemon.reload_policy()
    assert result.label_store_error is not None
    assert "dom0's label 'mgt'" in result.label_store_error
    assert daemon.label_store_reload_failures == 1
    assert daemon.engine.labels.domain_label(None, "new-1") is None
    assert daemon.engine.dom0_label() == "dom0"
    st = daemon.status()
    assert st.label_store["reload_failures"] == 1
    assert "dom0's label 'mgt'" in st.label_store["error"]
    assert load_label_store(path).dom0 == "mgt"  # the file is the operator's to fix


@pytest_twisted.ensureDeferred
async def test_an_update_deleting_dom0s_stored_label_is_refused(
    host: Harness, tmp_path: Path
) -> None:
    store = tmp_path / "labels.json"
    shutil.copy(LABELS, store)
    doc = json.loads(store.read_text())
    doc["dom0"] = "netdom"
    store.write_text(json.dumps(doc))
    daemon = await host.start(host.config(labels=store))
    assert daemon.engine.dom0_label() == "netdom"
    v11 = policy_variant(
        tmp_path, "hosting-1.1.toml", UPDATE_HEADER, ('name = "netdom"\n', 'name = "net2"\n')
    )
    result = await daemon.reload_policy(v11)
    assert not result.applied
    assert any("Domain-0" in p and "'netdom'" in p for p in result.problems), result.problems
