"""Random valid policies for the ACM XML, policy update and analysis tests (hypothesis)."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st
from policy_helpers import no_own_conflict

from shyped.policy.acm_xml import UNLABELED
from shyped.policy.model import (
    ConflictSet,
    Defaults,
    MlsLabel,
    Policy,
    PolicyRef,
    PolicyVersion,
    Quota,
    ResourceLabel,
    VmLabel,
)

# Names as ACM allows them: no whitespace, no ':'; include XML-special and non-ASCII
# characters so export escaping is exercised.
_NAME_CHARS = "abcXYZ019_.-()&<>\"'é€"
names = st.text(alphabet=_NAME_CHARS, min_size=1, max_size=6)
versions = st.builds(PolicyVersion, st.integers(0, 10**8 - 1), st.integers(0, 10**8 - 1))
LEVELS = ("low", "mid", "high")
CATEGORIES = ("k0", "k1", "k2")


@st.composite
def policies(
    draw: st.DrawFn,
    *,
    acm: bool = True,
    max_labels: int = 7,
    name: str | None = None,
    ste_pool: Sequence[str] | None = None,
    cw_pool: Sequence[str] | None = None,
    label_pool: Sequence[str] | None = None,
    res_pool: Sequence[str] | None = None,
) -> Policy:
    """A random valid policy.

    `acm=True`: only what ACM XML can express (no MLS, no quotas, defaults only through
    ``__UNLABELED__``), with random names. `acm=False`: also MLS parts and arbitrary defaults.
    The pools fix the universe of names, so that policies drawn with the same pools overlap
    (for update tests); without pools names are random.
    """
    if ste_pool is None:
        ste = draw(st.lists(names, unique=True, max_size=5))
    else:
        ste = draw(st.lists(st.sampled_from(ste_pool), unique=True, max_size=len(ste_pool)))
    if cw_pool is None:
        cw = draw(st.lists(names, unique=True, max_size=5))
    else:
        cw = draw(st.lists(st.sampled_from(cw_pool), unique=True, max_size=len(cw_pool)))
    set_types = (
        st.lists(st.sampled_from(cw), unique=True, min_size=2, max_size=len(cw))
        if len(cw) >= 2
        else st.nothing()
    )
    raw_sets = draw(st.lists(set_types, max_size=3)) if len(cw) >= 2 else []
    set_names = draw(st.lists(names, unique=True, min_size=len(raw_sets), max_size=len(raw_sets)))
    sets = [ConflictSet(n, t) for n, t in zip(set_names, raw_sets, strict=True)]
    fsets = [cs.types for cs in sets]

    mls_on = not acm and draw(st.booleans())
    mls_labels = st.builds(
        MlsLabel, st.sampled_from(LEVELS), st.frozensets(st.sampled_from(CATEGORIES))
    )

    def mls_part() -> MlsLabel | None:
        return draw(st.none() | mls_labels) if mls_on else None

    label_names = (
        names | (st.just(UNLABELED) if acm else st.nothing())
        if label_pool is None
        else st.sampled_from(label_pool)
    )
    vm_names = draw(st.lists(label_names, unique=True, min_size=1, max_size=max_labels))
    from_names = draw(
        st.lists(
            st.none() | (names if label_pool is None else st.sampled_from(label_pool)),
            min_size=len(vm_names),
            max_size=len(vm_names),
        )
    )
    seen_from: set[str] = set()
    vms = []
    for n, frm in zip(vm_names, from_names, strict=True):
        if frm in seen_from:
            frm = None
        if frm is not None:
            seen_from.add(frm)
        ste_pick = draw(st.frozensets(st.sampled_from(ste), max_size=3)) if ste else frozenset()
        cw_pick = draw(st.lists(st.sampled_from(cw), unique=True, max_size=3)) if cw else []
        vms.append(
            VmLabel(
                n,
                ste_pick,
                no_own_conflict(cw_pick, fsets),
                mls_part(),
                Quota(),
                from_name=frm,
            )
        )
    res: list[ResourceLabel] = []
    if ste:
        res_names = draw(
            st.lists(
                names if res_pool is None else st.sampled_from(res_pool),
                unique=True,
                max_size=4,
            )
        )
        seen_from = set()
        for n in res_names:
            frm = draw(st.none() | (names if res_pool is None else st.sampled_from(res_pool)))
            if frm in seen_from:
                frm = None
            if frm is not None:
                seen_from.add(frm)
            res.append(ResourceLabel(n, draw(st.sampled_from(ste)), mls_part(), from_name=frm))
    if acm:
        defaults = Defaults(
            UNLABELED if UNLABELED in vm_names else None,
            UNLABELED if any(r.name == UNLABELED for r in res) else None,
        )
    else:
        defaults = Defaults(
            draw(st.none() | st.sampled_from(vm_names)),
            draw(st.none() | st.sampled_from([r.name for r in res])) if res else None,
        )
    return Policy(
        name=name if name is not None else draw(names),
        version=draw(versions),
        bootstrap=draw(st.sampled_from(vm_names)),
        ste_types=ste,
        cw_types=cw,
        conflict_sets=sets,
        vm_labels=vms,
        resource_labels=res,
        mls_levels=LEVELS if mls_on else (),
        mls_categories=CATEGORIES if mls_on else (),
        defaults=defaults,
        from_policy=draw(st.none() | st.builds(PolicyRef, names, versions)),
    )
