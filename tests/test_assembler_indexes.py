"""The assembler's indexes (UUID -> domains, client -> vchan candidates, peer -> shared
nodes) against a naive recomputation from its state, and the same random event sequences fed in
one batch and in many small batches."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shyped.core.assembler import EventAssembler
from shyped.core.events import Node
from shyped.core.quota import CountedLabels

UUIDS = ("11111111-2222-3333-4444-555555555555", "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")
DOMIDS = (1, 2, 3)


def _domain(d: int, uuid: str) -> list[Node]:
    home = f"/local/domain/{d}"
    return [
        (f"/vm/{uuid}", b"", None),
        (f"/libxl/{d}", b"", None),
        (f"/libxl/{d}/type", b"pv", None),
        (home, b"", None),
        (home + "/name", f"g{d}".encode(), None),
        (home + "/vm", f"/vm/{uuid}".encode(), None),
    ]


def _vchan(s: int, name: str, readers: list[int], key: str) -> Node:
    perms = [f"n{s}".encode()] + [f"r{r}".encode() for r in readers]
    return (f"/local/domain/{s}/data/{name}/{key}", b"7", perms)


domids = st.sampled_from(DOMIDS)
uuids = st.sampled_from(UUIDS)
vchan_write = st.builds(
    lambda s, n, rs, k: [_vchan(s, n, rs, k)],
    domids,
    st.sampled_from(("a", "b")),
    st.lists(domids, max_size=3),
    st.sampled_from(("ring-ref", "event-channel")),
)
pointer = st.builds(
    lambda d, u: [(f"/vm/{u}", b"", None), (f"/local/domain/{d}/vm", f"/vm/{u}".encode(), None)],
    domids,
    uuids,
)
#: Writes only: removals and junk pointers are sticky for an announced domain by design (an
#: announced domain goes only with its home), so with them one batch and several may differ.
write_step = st.one_of(st.builds(_domain, domids, uuids), pointer, vchan_write)
step = st.one_of(
    write_step,
    st.builds(lambda d: [(f"/local/domain/{d}", None, None)], domids),
    st.builds(lambda u: [(f"/vm/{u}", None, None)], uuids),
    st.just([("/vm", None, None)]),
    st.builds(lambda d: [(f"/local/domain/{d}/vm", b"junk", None)], domids),
    st.builds(
        lambda s, n: [(f"/local/domain/{s}/data/{n}", None, None)],
        domids,
        st.sampled_from(("a", "b")),
    ),
    st.builds(
        lambda s, n, k: [(f"/local/domain/{s}/data/{n}/{k}", None, None)],
        domids,
        st.sampled_from(("a", "b")),
        st.sampled_from(("ring-ref", "event-channel")),
    ),
)


def _naive_by_uuid(asm: EventAssembler) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for d, dom in asm._doms.items():
        if dom.uuid is not None:
            out.setdefault(dom.uuid, set()).add(d)
    return out


def _naive_clients(asm: EventAssembler) -> dict[int, set[tuple[int, str]]]:
    out: dict[int, set[tuple[int, str]]] = {}
    for s, dom in asm._doms.items():
        for path, vc in dom.vchans.items():
            for d in vc.named_readers():
                out.setdefault(d, set()).add((s, path))
    return out


def _naive_peers(asm: EventAssembler) -> dict[int, set[tuple[int, str]]]:
    out: dict[int, set[tuple[int, str]]] = {}
    for owner, nodes in asm._shared._by_owner.items():
        for path, cur in nodes.items():
            for d in cur.peers:
                out.setdefault(d, set()).add((owner, path))
    return out


def _check_indexes(asm: EventAssembler) -> None:
    assert {u: set(asm._with_uuid(u)) for u in asm._by_uuid} == _naive_by_uuid(asm)
    assert all(isinstance(ids, int) or len(ids) > 1 for ids in asm._by_uuid.values())
    assert asm._clients == _naive_clients(asm)
    assert asm._shared._by_peer == _naive_peers(asm)


def _decisions(asm: EventAssembler) -> tuple[object, ...]:
    """What the daemon decides on: announced domains and published vchans."""
    doms = sorted((d, dom.emitted) for d, dom in asm._doms.items() if dom.emitted is not None)
    vchans = sorted(
        (s, p, vc.emitted)
        for s, dom in asm._doms.items()
        for p, vc in dom.vchans.items()
        if vc.emitted is not None
    )
    return tuple(doms), tuple(vchans)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, max_size=25), cut=st.integers(1, 5))
def test_indexes_match_a_naive_recomputation_in_any_batching(
    steps: list[list[Node]], cut: int
) -> None:
    nodes = [n for s in steps for n in s]
    one = EventAssembler()
    one.feed_batch(nodes)
    _check_indexes(one)
    small = EventAssembler()
    for i in range(0, len(nodes), cut):
        small.feed_batch(nodes[i : i + cut])
        _check_indexes(small)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(write_step, max_size=25), cut=st.integers(1, 5))
def test_writes_reach_the_same_decisions_in_one_batch_and_in_many(
    steps: list[list[Node]], cut: int
) -> None:
    nodes = [n for s in steps for n in s]
    one = EventAssembler()
    one.feed_batch(nodes)
    small = EventAssembler()
    for i in range(0, len(nodes), cut):
        small.feed_batch(nodes[i : i + cut])
    each = EventAssembler()
    for s in steps:
        each.feed_batch(s)
    _check_indexes(small)
    _check_indexes(each)
    assert _decisions(one) == _decisions(small) == _decisions(each)


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 6), st.one_of(st.none(), st.sampled_from(("a", "b", "c")))),
        max_size=40,
    )
)
def test_counted_labels_match_a_naive_count(ops: list[tuple[int, str | None]]) -> None:
    counted = CountedLabels()
    naive: dict[int, str] = {}
    for d, label in ops:
        if label is None:
            assert counted.pop(d, None) == naive.pop(d, None)
        else:
            counted[d] = label
            naive[d] = label
        for name in ("a", "b", "c"):
            assert counted.with_label(name) == {k for k, v in naive.items() if v == name}
    assert dict(counted) == naive
    assert dict(CountedLabels(naive)) == naive
