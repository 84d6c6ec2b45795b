"""The daemon's batch policy: fair per guest domain, trusted paths first, nothing left behind."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shyped.core.fairbatch import FairBatches, guest_of


@pytest.mark.parametrize(
    ("path", "domid"),
    [
        ("/vm/0f0f", None),
        ("/libxl/7/device/vif/0/frontend", None),
        ("@introduceDomain", None),
        ("@releaseDomain", None),
        ("/local/domain/0/backend/vif/7/0/state", None),
        ("/local/domain/7", None),
        ("/local/domain/7/name", None),
        ("/local/domain/7/vm", None),
        ("/local/domain/7/domid", None),
        ("/local/domain/7/data/x/ring-ref", 7),
        ("/local/domain/7/name/sub", 7),
        ("/local/domain/7/device/vif/0/state", 7),
        ("/local/domain/7/memory", 7),
        ("/local/domain/12/backend/vif/7/0/state", 12),
    ],
)
def test_whose_budget_a_path_counts_against(path: str, domid: int | None) -> None:
    assert guest_of(path) == domid


def _flood(q: FairBatches, domid: int, n: int, t: float = 0.0) -> list[str]:
    paths = [f"/local/domain/{domid}/data/f{i}/ring-ref" for i in range(n)]
    for p in paths:
        q.add(p, t)
    return paths


def test_a_flooding_guest_gets_its_budget_and_the_others_go_first_with_trusted_paths() -> None:
    q = FairBatches(per_domain=10, per_batch=100)
    flood = _flood(q, 5, 1000)
    rival = ["/vm/u", "/libxl/9/type", "/local/domain/9", "/local/domain/9/data/x"]
    for p in rival:
        q.add(p, 1.0)
    q.begin()
    taken, earliest = q.take()
    assert taken[:3] == rival[:3]  # trusted first
    assert "/local/domain/9/data/x" in taken
    assert [p for p in taken if p in flood] == flood[:10]  # oldest first, its budget only
    assert earliest == 0.0
    assert len(q) == 990 and q.waiting(5) == 990
    # A second round in the same batch gets nothing more of the flood.
    q.add("/local/domain/9/data/y", 2.0)
    assert q.take() == (["/local/domain/9/data/y"], 2.0)
    assert q.waiting(5) == 990


def test_a_path_that_fires_again_while_deferred_keeps_its_place_and_first_time() -> None:
    q = FairBatches(per_domain=2, per_batch=100)
    paths = _flood(q, 5, 4)
    q.begin()
    assert q.take()[0] == paths[:2]
    q.add(paths[3], 9.0)  # fires again: still one pending read, first arrival kept
    q.add(paths[0], 9.0)  # read already: pending again, behind the others
    assert len(q) == 3 and paths[3] in q
    q.begin()
    assert q.take() == (paths[2:4], 0.0)
    q.begin()
    assert q.take() == ([paths[0]], 9.0)
    assert not q


def test_the_batch_cap_turns_round_robin_over_flooding_domains() -> None:
    q = FairBatches(per_domain=10, per_batch=25)
    for d in (1, 2, 3, 4):
        _flood(q, d, 100)
    served: list[set[int]] = []
    for _ in range(4):
        q.begin()
        taken, _ = q.take()
        assert len(taken) == 25
        served.append({guest_of(p) or 0 for p in taken})
    # Each batch reaches three domains; in four batches every domain was served thrice.
    counts = {d: sum(d in s for s in served) for d in (1, 2, 3, 4)}
    assert counts == {1: 3, 2: 3, 3: 3, 4: 3}


def test_a_backlog_past_its_bound_becomes_one_reread_of_the_guests_tree() -> None:
    q = FairBatches(per_domain=4, per_batch=100, max_waiting=10)
    _flood(q, 3, 5, t=1.0)
    _flood(q, 5, 10, t=2.0)
    assert q.overflows == 0 and q.waiting(5) == 10
    q.add("/local/domain/5/data/more", 3.0)  # the 11th: dropped, its tree to be read again
    assert q.overflows == 1 and q.waiting(5) == 11
    q.add("/local/domain/5/data/later", 4.0)  # nothing more is kept for it
    q.add("/local/domain/5/name", 4.0)  # trusted: kept
    assert len(q) == 5 + 1 + 1
    q.begin()
    taken, _ = q.take()
    assert taken[0] == "/local/domain/5/name" and len(taken) == 1 + 4
    assert q.take_overflowed() == {5: 2.0}
    assert q.take_overflowed() == {}
    q.add("/local/domain/5/data/after", 5.0)  # after the re-read was taken: queued again
    assert q.waiting(5) == 1 and len(q) == 2


def test_bad_budgets_are_refused() -> None:
    for bad in ({"per_domain": 0}, {"per_batch": 0}, {"max_waiting": 0}):
        with pytest.raises(ValueError, match="at least 1"):
            FairBatches(**bad)


@given(
    adds=st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 30)),  # (domain, node)
        max_size=300,
    ),
    per_domain=st.integers(1, 8),
    per_batch=st.integers(1, 20),
)
def test_every_pending_path_is_taken_within_the_bound(
    adds: list[tuple[int, int]], per_domain: int, per_batch: int
) -> None:
    q = FairBatches(per_domain=per_domain, per_batch=per_batch)
    pending: set[str] = set()
    for d, n in adds:
        path = f"/local/domain/{d}/data/{n}" if d else f"/libxl/{n}"
        q.add(path, 0.0)
        pending.add(path)
    domains = {d for d, _ in adds if d}
    bound = -(-len(domains) * min(per_domain, per_batch) // per_batch)  # ceil
    passed_over = dict.fromkeys(domains, 0)
    batches = 0
    while q:
        waiting = {d for d in domains if q.waiting(d)}
        q.begin()
        taken, _ = q.take()
        assert taken and set(taken) <= pending
        pending -= set(taken)
        batches += 1
        got = {guest_of(p) for p in taken}
        for d in waiting:
            passed_over[d] = 0 if d in got else passed_over[d] + 1
            assert passed_over[d] < max(bound, 1), "a domain waited past the bound"
        assert batches <= 1 + len(adds)
    assert not pending
    assert len(q) == 0
