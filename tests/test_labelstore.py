import os
from pathlib import Path

import pytest

from shyped.labelstore import (
    LabelStore,
    LabelStoreError,
    bridge_resource,
    disk_resource,
    load_label_store,
    parse_label_store,
    resource_id,
    save_label_store,
)

UUID = "6f1b1c9e-2a4d-4c55-9e0e-5ca1ab1e0001"


def test_resource_ids_normalise_operator_spellings() -> None:
    assert resource_id("file:/var/lib/xen/images/a.img") == "disk:/var/lib/xen/images/a.img"
    assert resource_id("phy:/dev/vg0/../vg0/lv") == "disk:/dev/vg0/lv"
    assert resource_id("/srv/x.img") == disk_resource("/srv/x.img")
    assert resource_id("bridge:xenbr0") == bridge_resource("xenbr0") == "bridge:xenbr0"
    for bad in ("relative.img", "bridge:bad name", "file:", "bridge:"):
        with pytest.raises(LabelStoreError):
            resource_id(bad)


def test_domain_label_prefers_uuid_over_name() -> None:
    store = LabelStore().with_domain(name="web", label="blue").with_domain(uuid=UUID, label="red")
    assert store.domain_label(UUID.upper(), "web") == "red"
    assert store.domain_label(None, "web") == "blue"
    assert store.domain_label("00000000-0000-0000-0000-000000000000", "other") is None
    assert store.with_domain(uuid=UUID, label=None).domain_label(UUID, None) is None


def test_round_trip_through_disk_is_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "labels.json"
    assert load_label_store(path) == LabelStore()
    store = (
        LabelStore()
        .with_domain(uuid=UUID, label="red")
        .with_resource("file:/img/a.img", "red-disk")
        .with_resource("bridge:xenbr0", "net")
    )
    save_label_store(store, path)
    assert load_label_store(path) == store
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert [p.name for p in path.parent.iterdir()] == ["labels.json"]


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"version": 2}',
        '{"version": 1, "domains": {"uuid": {"nope": "red"}}}',
        '{"version": 1, "resources": {"relative": "red"}}',
        '{"version": 1, "resources": {"/a": 3}}',
        '{"version": 1, "domains": {"name": {"web": "bad label"}}}',
    ],
)
def test_bad_store_is_refused_whole(text: str) -> None:
    with pytest.raises(LabelStoreError, match=r"labels\.json"):
        parse_label_store(text, "/var/lib/shyped/labels.json")
