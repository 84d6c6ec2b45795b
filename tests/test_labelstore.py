import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shyped.core.labelstore import (
    LabelStore,
    LabelStoreError,
    bridge_resource,
    canonical_resource,
    disk_resource,
    load_label_store,
    parse_label_store,
    resolve_resource,
    resource_id,
    save_label_store,
)

UUID = "6f1b1c9e-2a4d-4c55-9e0e-5ca1ab1e0001"


def test_resource_ids_normalise_operator_spellings() -> None:
    assert resource_id("file:/var/lib/xen/images/a.img") == "disk:/var/lib/xen/images/a.img"
    assert resource_id("phy:/dev/vg0/./lv") == "disk:/dev/vg0/lv"
    assert resource_id("/srv/x.img") == disk_resource("/srv/x.img")
    assert resource_id("bridge:xenbr0") == bridge_resource("xenbr0") == "bridge:xenbr0"
    for bad in (
        "relative.img",
        "bridge:bad name",
        "file:",
        "bridge:",
        "phy:/dev/vg0/../vg0/lv",  # `..` after a symlink is not what it reads as: refused
        "/srv/a.img ",  # libxl keeps the blank: another file
        " /srv/a.img",
        "/srv/a\x01.img",
    ):
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


def test_resource_ids_collapse_slashes_and_prefixes_as_acm_did() -> None:
    want = "disk:/srv/xen/images/a.img"
    for spelling in (
        "//srv/xen/images/a.img",
        "///srv//xen///images/a.img",
        "/srv/xen/./images/./a.img",
        "file://srv/xen/images/a.img",
        "aio:/srv/xen/images/a.img",  # libxl's qdisk params
        "qcow2:/srv/xen/images/a.img",
        "tap:aio://srv/xen/images/a.img",
        "disk:/srv/xen/images/a.img",  # the canonical id itself
        "/srv/xen/images/a.img/",
    ):
        assert resource_id(spelling) == want, spelling
    assert resource_id("phy:sda") == "disk:/dev/sda"  # ACM's unify_resname
    assert resource_id("//") == "disk:/"


def test_resolve_follows_symlinks_where_the_file_exists(tmp_path: Path) -> None:
    real = tmp_path / "real.img"
    real.write_bytes(b"x")
    link = tmp_path / "sub" / "link.img"
    link.parent.mkdir()
    link.symlink_to(real)
    assert canonical_resource(f"//{link}") == f"disk:{real}"
    assert canonical_resource(f"{tmp_path}/./sub/link.img") == f"disk:{real}"
    assert resolve_resource("bridge:xenbr0") == "bridge:xenbr0"


def test_two_spellings_of_one_file_with_different_labels_are_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.img"
    real.write_bytes(b"x")
    (tmp_path / "link.img").symlink_to(real)
    path = tmp_path / "labels.json"
    store = (
        LabelStore().with_resource(str(real), "a").with_resource(str(tmp_path / "link.img"), "b")
    )
    path.write_text(store.to_json())
    with pytest.raises(LabelStoreError, match="name the same file"):
        load_label_store(path)
    same = LabelStore().with_resource(str(real), "a").with_resource(f"/{tmp_path}/link.img", "a")
    path.write_text(same.to_json())
    assert load_label_store(path).resources == {f"disk:{real}": "a"}


@given(st.text(alphabet="/.ab", min_size=1, max_size=30))
def test_canonical_disk_ids_are_single_slashed_and_stable(tail: str) -> None:
    if ".." in tail.split("/"):
        with pytest.raises(LabelStoreError, match=r"'\.\.'"):
            resource_id("/" + tail)
        return
    rid = resource_id("/" + tail)
    path = rid.removeprefix("disk:")
    assert path.startswith("/") and "//" not in path
    assert "/./" not in path + "/" and "/../" not in path + "/"
    assert resource_id(rid) == rid  # ids round-trip
    assert resource_id("/" + "/" + tail) == rid  # a leading // is the same file


def test_a_bad_store_is_refused_with_every_problem_at_its_line() -> None:
    from shyped.core.labelstore import LabelStoreError, parse_label_store

    text = (
        '{\n  "version": 1,\n'
        '  "domains": {"name": {"a": "x", "a": "y", "bad name": "x"}},\n'  # 3: twice, bad name
        '  "resources": {"../up.img": "r"},\n'  # 4
        '  "extra": 1\n}\n'  # 5
    )
    with pytest.raises(LabelStoreError) as err:
        parse_label_store(text, "labels.json")
    lines = str(err.value).splitlines()
    assert lines[0] == (
        "labels.json:3: 'domains.name.a' is defined twice (first at line 3); "
        "JSON would keep only the last"
    )
    assert lines[1] == "labels.json:3: invalid domain name 'bad name'"
    assert lines[2].startswith("labels.json:4: invalid resource '../up.img'")
    assert lines[3] == "labels.json:5: unknown key 'extra'"
    assert len(lines) == 4
