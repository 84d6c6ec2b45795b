"""The watch batch skips reads the assembler would not use (`shyped.core.assembler.readset`):
random bursts of toolstack and guest changes, fed whole and without the skipped paths, must
give the same events and the same decisions; and the skipped set is what the docstring
promises on a real vif transaction's paths."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shyped.core.assembler import EventAssembler
from shyped.core.assembler.readset import unread_paths
from shyped.core.events import Node, needs_perms

UUID = "11111111-2222-3333-4444-555555555555"
FRONT = "/local/domain/1/device/vif/0"
BACK = "/local/domain/0/backend/vif/1/0"
RECORD = "/libxl/1/device/vif/0"

#: (path, plausible values) of the nodes a domain with one vif is made of
NODES: list[tuple[str, list[bytes]]] = [
    (f"/vm/{UUID}", [b""]),
    (f"/vm/{UUID}/name", [b"g1"]),
    (f"/vm/{UUID}/image/ostype", [b"linux"]),
    ("/libxl/1", [b""]),
    ("/libxl/1/type", [b"pv", b"junk"]),
    ("/local/domain/1", [b""]),
    ("/local/domain/1/name", [b"g1"]),
    ("/local/domain/1/vm", [f"/vm/{UUID}".encode()]),
    (RECORD, [b""]),
    (RECORD + "/frontend", [FRONT.encode(), b"/elsewhere"]),
    (RECORD + "/backend", [BACK.encode()]),
    (RECORD + "/bridge", [b"xenbr0", b"xenbr1"]),
    (RECORD + "/script", [b"vif-bridge"]),
    (RECORD + "/type", [b"vif"]),
    (RECORD + "/mac", [b"00:16:3e:00:00:01"]),
    (RECORD + "/state", [b"1"]),
    (RECORD + "/online", [b"1"]),
    (RECORD + "/frontend-id", [b"1"]),
    (BACK, [b""]),
    (BACK + "/frontend", [FRONT.encode()]),
    (BACK + "/frontend-id", [b"1", b"2"]),
    (BACK + "/state", [b"1", b"4", b"99"]),
    (BACK + "/online", [b"1", b"0", b"x"]),
    (BACK + "/bridge", [b"xenbr0"]),
    (BACK + "/mac", [b"00:16:3e:00:00:01"]),
    (BACK + "/hotplug-status", [b"connected"]),
    (BACK + "/deep/er", [b"x"]),
    (FRONT, [b""]),
    (FRONT + "/backend", [BACK.encode()]),
    (FRONT + "/backend-id", [b"0"]),
    (FRONT + "/state", [b"1", b"4"]),
    (FRONT + "/mac", [b"00:16:3e:00:00:01"]),
]
_VALUES = dict(NODES)


def _parents(path: str) -> list[str]:
    comps = path.split("/")
    return ["/".join(comps[:i]) for i in range(2, len(comps))]


write = st.builds(
    lambda i, j: ("w", NODES[i][0], NODES[i][1][j % len(NODES[i][1])]),
    st.integers(0, len(NODES) - 1),
    st.integers(0, 2),
)
remove = st.builds(lambda i: ("rm", NODES[i][0], None), st.integers(0, len(NODES) - 1))
burst = st.lists(st.one_of(write, write, remove), min_size=1, max_size=12)


def _perms(path: str, present: bool) -> list[bytes] | None:
    if not present or not needs_perms(path):
        return None
    return [path.split("/")[3].join(("n", ""))]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bursts=st.lists(burst, min_size=1, max_size=8))
def test_skipped_reads_change_no_event_and_no_decision(
    bursts: list[list[tuple[str, str, bytes | None]]],
) -> None:
    """Each burst: ops on a xenstore tree (writes create parents, removals take subtrees),
    then the changed paths read as they are now, as a watch batch reads them."""
    tree: dict[str, bytes] = {}
    whole, skipping = EventAssembler(), EventAssembler()
    for ops in bursts:
        changed: list[str] = []
        for op, path, value in ops:
            if op == "w":
                assert value is not None
                for parent in _parents(path):
                    tree.setdefault(parent, b"")
                tree[path] = value
            else:
                for p in [p for p in tree if p == path or p.startswith(path + "/")]:
                    del tree[p]
            changed.append(path)
        paths = list(dict.fromkeys(changed))
        nodes: list[Node] = [(p, tree.get(p), _perms(p, p in tree)) for p in paths]
        unused = unread_paths(set(paths))
        assert whole.feed_batch(nodes) == skipping.feed_batch(
            [n for n in nodes if n[0] not in unused]
        )
    assert whole.present_domains() == skipping.present_domains()


def test_a_vif_transaction_reads_what_the_assembler_judges() -> None:
    paths = {p for p, _ in NODES if p.startswith((RECORD, BACK, FRONT))}
    assert unread_paths(paths) == {
        RECORD + "/mac",
        RECORD + "/state",
        RECORD + "/online",
        RECORD + "/frontend-id",
        BACK + "/frontend",
        BACK + "/bridge",
        BACK + "/mac",
        BACK + "/hotplug-status",
        BACK + "/deep/er",
    }
    # without the record's directory in the same round, its keys are read
    assert not unread_paths({RECORD + "/mac"})
    # a guest's own frontend is always read (grants hide anywhere there)
    assert not unread_paths({FRONT, FRONT + "/mac"}) & {FRONT + "/mac"}
    # a malformed backend path is read (the assembler reports it)
    assert unread_paths({"/local/domain/0/backend/vif/x/0/mac"}) == set()
