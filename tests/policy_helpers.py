"""Shared helpers for the policy tests: random valid policies (hypothesis) and a reference."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st

from shyped.policy.model import (
    ConflictSet,
    Defaults,
    MlsLabel,
    Policy,
    PolicyVersion,
    Quota,
    ResourceLabel,
    VmLabel,
)


def no_own_conflict(cw: Sequence[str], sets: Sequence[frozenset[str]]) -> frozenset[str]:
    """Drop types from `cw` until no two of them share a conflict set (keeps a valid label)."""
    kept: list[str] = []
    for t in cw:
        if all(not ({t, k} <= s) for s in sets for k in kept):
            kept.append(t)
    return frozenset(kept)


@st.composite
def policies(draw: st.DrawFn, max_labels: int = 8, mls: bool = True) -> Policy:
    """A random valid policy: few types, overlapping conflict sets, optional MLS parts."""
    ste = [f"s{i}" for i in range(draw(st.integers(1, 5)))]
    cw = [f"c{i}" for i in range(draw(st.integers(2, 6)))]
    sets = draw(
        st.lists(st.frozensets(st.sampled_from(cw), min_size=2, max_size=len(cw)), max_size=4)
    )
    levels = ["low", "mid", "high"]
    cats = ["k0", "k1", "k2"]
    mls_labels = st.builds(MlsLabel, st.sampled_from(levels), st.frozensets(st.sampled_from(cats)))
    n = draw(st.integers(1, max_labels))
    labels = []
    for i in range(n):
        cw_pick = draw(st.lists(st.sampled_from(cw), unique=True, max_size=3))
        labels.append(
            VmLabel(
                f"L{i}",
                draw(st.frozensets(st.sampled_from(ste), max_size=3)),
                no_own_conflict(cw_pick, sets),
                draw(st.none() | mls_labels) if mls else None,
                Quota(max_domains=draw(st.none() | st.integers(0, 5))),
            )
        )
    resources = [
        ResourceLabel(
            f"R{i}", draw(st.sampled_from(ste)), draw(st.none() | mls_labels) if mls else None
        )
        for i in range(draw(st.integers(0, 4)))
    ]
    return Policy(
        name="rand.policy",
        version=PolicyVersion(draw(st.integers(0, 99)), draw(st.integers(0, 99))),
        bootstrap="L0",
        ste_types=ste,
        cw_types=cw,
        conflict_sets=[ConflictSet(f"set{i}", s) for i, s in enumerate(sets)],
        vm_labels=labels,
        resource_labels=resources,
        mls_levels=levels if mls else (),
        mls_categories=cats if mls else (),
        defaults=Defaults(
            draw(st.none() | st.sampled_from([lab.name for lab in labels])),
            draw(st.none() | st.sampled_from([r.name for r in resources])) if resources else None,
        ),
    )


def brute_force_admits(policy: Policy, running: Sequence[VmLabel], label: VmLabel) -> bool:
    """The Chinese Wall rule stated directly over the running domains (the reference).

    `label` may not start if some running domain R shares a type with a conflict set C and the
    label carries a type of C that R does not carry.
    """
    for r in running:
        for cs in policy.conflict_sets:
            if cs.types & r.cw_types and label.cw_types & (cs.types - r.cw_types):
                return False
    return True
