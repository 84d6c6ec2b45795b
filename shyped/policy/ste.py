"""Simple Type Enforcement: two labels may interact only if they share an STE type.

ACM checked this on event channel allocation/binding and on grant mapping and cached positive
results per domain pair (``xen/xsm/acm/acm_simple_type_enforcement_hooks.c``, Xen 3.4). Here the
cache is keyed by the (unordered) *label* pair and lives in an `StePairCache` tied to one
policy, so a new policy comes with a new, empty cache and nothing needs flushing on domain death.
"""

from __future__ import annotations

from typing import Final

import attrs

from shyped.policy.model import Policy

#: Default bound on cached label pairs; the cache is simply cleared when it is full.
DEFAULT_CACHE_SIZE: Final = 1 << 16


def common_types(a: frozenset[str], b: frozenset[str]) -> frozenset[str]:
    """STE types shared by two type sets (empty: STE denies)."""
    return a & b


@attrs.define
class StePairCache:
    """Common STE types per unordered pair of VM labels of one policy.

    Symmetric by construction (the key is the sorted pair). Bounded: when `maxsize` pairs are
    cached the cache is cleared, which keeps memory flat whatever the label churn.
    """

    policy: Policy
    maxsize: int = DEFAULT_CACHE_SIZE
    _pairs: dict[tuple[str, str], frozenset[str]] = attrs.field(init=False, factory=dict)

    def common(self, a: str, b: str) -> frozenset[str]:
        """Common STE types of VM labels `a` and `b` (KeyError if either is unknown)."""
        key = (a, b) if a <= b else (b, a)
        hit = self._pairs.get(key)
        if hit is not None:
            return hit
        la, lb = self.policy.vm_label(a), self.policy.vm_label(b)
        if la is None or lb is None:
            raise KeyError(a if la is None else b)
        result = common_types(la.ste_types, lb.ste_types)
        if len(self._pairs) >= self.maxsize:
            self._pairs.clear()
        self._pairs[key] = result
        return result

    def __len__(self) -> int:
        return len(self._pairs)
