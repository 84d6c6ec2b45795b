"""MLS (multi-level security) rules. ACM did not implement MLS; this is shyped's choice.

A label's MLS part is a level (policy-declared, totally ordered low to high) and a set of
categories. ``a`` *dominates* ``b`` when ``level(a) >= level(b)`` and
``categories(a) ⊇ categories(b)`` (the usual lattice order).

Rules per hook (information flows along the arrow; no read up, no write down):

- two-way channels (event channel, PV device channel, vchan) and *writable* grant maps carry
  data both ways: both labels must be **equal** (same level, same categories);
- a *read-only* grant map lets the mapper read the granter's page (granter → mapper): the
  **mapper must dominate the granter**;
- *read-only* resource use (disk mode ``r``): the **domain must dominate the resource**;
- *read-write* resource use (disk mode ``w``, any bridge): **equal** labels.

MLS applies only when *both* labels carry an MLS part: a label without one is MLS-exempt
(typically dom0 and shared driver domains, trusted to keep their clients apart; STE and the
Chinese Wall still apply to them). Domain admission does not use MLS.
"""

from __future__ import annotations

from shyped.policy.model import MlsLabel, Policy


def dominates(policy: Policy, a: MlsLabel, b: MlsLabel) -> bool:
    """True if `a` dominates `b` in `policy`'s level order (KeyError on unknown levels)."""
    return policy.level_rank(a.level) >= policy.level_rank(b.level) and a.categories >= b.categories


def equal(a: MlsLabel, b: MlsLabel) -> bool:
    """Same level and same categories."""
    return a.level == b.level and a.categories == b.categories


def two_way_ok(a: MlsLabel, b: MlsLabel) -> bool:
    """A channel carrying data both ways needs equal labels."""
    return equal(a, b)


def read_ok(policy: Policy, reader: MlsLabel, source: MlsLabel) -> bool:
    """One-way flow source → reader: the reader must dominate the source (no read up)."""
    return dominates(policy, reader, source)
