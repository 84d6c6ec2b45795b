"""An accepted policy update that renames labels (``from =``) rewrites the label store with the
switch, as ACM rewrote assignments on rename (issue 11, finding 15): the renamed resource
label's disk stays attached, a re-created domain of the renamed VM label is admitted, and a
store that cannot be written keeps the old policy and the old store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import pytest_twisted
from daemon_helpers import HOSTING, LABELS, POLICY, Harness, domcfg, image


def renaming_policy(tmp_path: Path) -> Path:
    """hosting 1.1: VM label shop -> web-shop, resource label shop-disk -> shop-volume."""
    text = HOSTING.read_text()
    for old, new in (
        (
            'version = "1.0"\nbootstrap = "dom0"\n',
            'version = "1.1"\nbootstrap = "dom0"\n'
            'from = { name = "example.hosting", version = "1.0" }\n',
        ),
        ('name = "shop"\n', 'name = "web-shop"\nfrom = "shop"\n'),
        ('name = "shop-disk"\n', 'name = "shop-volume"\nfrom = "shop-disk"\n'),
    ):
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / "hosting-1.1.toml"
    path.write_text(text)
    return path


@pytest_twisted.ensureDeferred
async def test_a_rename_rewrites_the_label_store_with_the_switch(
    harness: Harness, tmp_path: Path
) -> None:
    labels = tmp_path / "labels.json"
    shutil.copy(LABELS, labels)
    daemon = await harness.start(harness.config(labels=labels))
    s = await harness.call(harness.ts.create, domcfg("shop-1", disks=[image("shop-1")]))
    await harness.settle()
    assert harness.last(f"device vbd {s}/51712").allowed
    result = await daemon.reload_policy(renaming_policy(tmp_path))
    assert result.applied, str(result)
    await harness.settle()
    # The running disk keeps its (renamed) label: not cut.
    assert harness.last(f"device vbd {s}/51712").allowed
    assert harness.exists(f"/libxl/{s}/device/vbd/51712")
    stored = json.loads(labels.read_text())
    assert stored["resources"]["disk:/srv/xen/images/shop-1.img"] == "shop-volume"
    assert stored["domains"]["name"]["shop-1"] == "web-shop"
    # The domain of the renamed VM label, created again, is admitted under the new name.
    await harness.call(harness.ts.destroy, s)
    await harness.settle()
    s2 = await harness.call(harness.ts.create, domcfg("shop-1", disks=[image("shop-1")]))
    await harness.settle()
    again = harness.last(f"domain {s2}")
    assert again.allowed and again.label == "web-shop"
    assert harness.read(f"/local/domain/{s2}/shyped/label") == f"ACM:{POLICY}:web-shop"
    assert harness.last(f"device vbd {s2}/51712").allowed


@pytest_twisted.ensureDeferred
async def test_a_store_that_cannot_be_rewritten_keeps_the_old_policy_and_store(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    labels = tmp_path / "labels.json"
    shutil.copy(LABELS, labels)
    daemon = await harness.start(harness.config(labels=labels))
    before = labels.read_bytes()

    def full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("shyped.service.policylabels.save_label_store", full)
    result = await daemon.reload_policy(renaming_policy(tmp_path))
    assert not result.applied and "No space left on device" in str(result)
    assert daemon.status().policy_version == "1.0"
    assert labels.read_bytes() == before
    assert daemon.engine.labels.domain_label(None, "shop-1") == "shop"
