"""The pool's key layout and the label store read back from etcd entries (pure)."""

from __future__ import annotations

import pytest

from shyped.core.labelstore import LabelStore
from shyped.pool import keys as k
from shyped.service.config import ConfigError, parse_config

U = "9a000000-0000-4000-8000-0000000000b1"


def test_label_keys_round_trip_and_other_hosts_resources_are_skipped() -> None:
    a, b = k.PoolKeys("/shyped/p1", "host-a"), k.PoolKeys("/shyped/p1", "host-b")
    store = (
        LabelStore()
        .with_domain(uuid=U, label="web")
        .with_domain(name="netdom", label="net")
        .with_resource("file:/srv/a b.img", "disk")
    )
    entries = a.label_keys(store)
    assert entries["/shyped/p1/labels/res/host-a/disk%3A%2Fsrv%2Fa%20b.img"] == "disk"
    assert k.labels_from_kvs(a, entries.items()).store == store
    on_b = k.labels_from_kvs(b, entries.items()).store
    assert on_b.resources == {} and on_b.by_uuid == {U: "web"}


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("/shyped/p1/labels/uuid/not-a-uuid", "web", "invalid domain uuid"),
        (f"/shyped/p1/labels/uuid/{U}", "bad label!", "invalid label name"),
        ("/shyped/p1/labels/name/../x", "web", "invalid domain name"),
        ("/shyped/p1/labels/res/host-a/%2E%2E", "disk", "invalid resource"),
        ("/shyped/p1/labels/what/x", "web", "unknown kind"),
        ("/other/labels/uuid/" + U, "web", "not a label key"),
        # a trailing newline passed the name checks (``$`` matches before it)
        ("/shyped/p1/labels/uuid/9a000000-0000-4000-8000-0000000000b2", "web\n", "invalid label"),
        ("/shyped/p1/labels/name/web\n", "web", "invalid domain name"),
        ("/shyped/p1/labels/res/host-a/bridge%3Axenbr0%0A", "net", "invalid bridge name"),
    ],
)
def test_bad_entries_are_refused_and_named_while_the_rest_applies(
    key: str, value: str, why: str
) -> None:
    keys = k.PoolKeys("/shyped/p1", "host-a")
    good = (f"/shyped/p1/labels/uuid/{U}", "web")
    snap = k.labels_from_kvs(keys, [good, (key, value)])
    assert snap.store.by_uuid == {U: "web"}
    assert len(snap.refused) == 1 and why in snap.refused[0]


def test_a_snapshot_past_the_bound_is_refused_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(k, "MAX_ENTRIES", 3)
    keys = k.PoolKeys("/p", "h")
    entries = [(f"/p/labels/name/d{i}", "web") for i in range(4)]
    with pytest.raises(k.PoolKeyError, match="more than 3"):
        k.labels_from_kvs(keys, entries)
    assert k.labels_from_kvs(keys, entries[:3]).store.by_name == {
        "d0": "web",
        "d1": "web",
        "d2": "web",
    }


@pytest.mark.parametrize("prefix", ["", "/", "shyped", "/a//b", "/a/b/", "/a b"])
def test_prefixes_that_cannot_be_used(prefix: str) -> None:
    with pytest.raises(k.PoolKeyError):
        k.PoolKeys(prefix, "h")


def test_range_end_covers_the_prefix_only() -> None:
    assert k.range_end("/p/labels/") == "/p/labels0"


def test_pool_config_is_off_by_default_and_checked() -> None:
    assert not parse_config('[policy]\npath = "p.toml"\n').pool.enabled
    cfg = parse_config(
        '[policy]\npath = "p.toml"\n[pool]\nendpoints = ["http://127.0.0.1:2379/"]\n'
        'host = "h1"\nprefix = "/shyped/p1"\n'
    )
    assert cfg.pool.enabled and cfg.pool.endpoints == ("http://127.0.0.1:2379",)
    for bad, what in (
        ('endpoints = ["ftp://x"]', "pool.endpoints"),
        ("endpoints = []", "pool.endpoints"),
        ('prefix = "x"', "pool prefix"),
        ('host = "-bad"', "pool host name"),
        ("lease_ttl = 1", "pool.lease_ttl"),
        ("colour = 1", "unknown key"),
    ):
        with pytest.raises(ConfigError, match=what):
            parse_config(f'[policy]\npath = "p.toml"\n[pool]\n{bad}\n')


def test_writer_owned_keys_name_their_writer() -> None:
    keys = k.PoolKeys("/p", "host-a")
    assert keys.answer("f" * 32) == "/p/policy/answers/host-a/host-a/" + "f" * 32
    theirs = keys.answer("f" * 32, "host-c", "host-b")
    assert theirs == "/p/policy/answers/host-c/host-b/" + "f" * 32
    assert keys.proposal("f" * 32) == "/p/policy/proposals/host-a/" + "f" * 32
    assert keys.request("host-c", "1" * 32) == "/p/reservations/host-a/host-c/" + "1" * 32
    assert keys.grant("1" * 32, "host-c") == "/p/grants/host-c/host-a/" + "1" * 32
    assert keys.owned(keys.answers, keys.answer("e" * 32, "host-b")) == (
        "host-b",
        "host-a/" + "e" * 32,
    )
    for bad in ("/p/policy/answers/host-b", "/p/policy/answers/-x/1", "/p/policy/answers//1"):
        assert keys.owned(keys.answers, bad) is None
    assert keys.owned(keys.answers, "/p/grants/host-b/1") is None
