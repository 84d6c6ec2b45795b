"""Chinese Wall admission over the set of running domains, as Xen ACM implemented it.

ACM (``xen/xsm/acm/acm_chinesewall_hooks.c``, Xen 3.4, ``_chwall_pre_domain_create`` and
``chwall_domain_destroy``) keeps a per-type *block count* (``conflict_aggregate_set``): when a
domain starts, for every conflict set sharing a type with its label, each type of the set that is
not one of the label's own types is incremented; when the domain is finally gone the same types
are decremented. A domain may start only if none of its Chinese Wall types has a non-zero count.
A label's own types never block themselves, so domains with the same label run side by side.

`RunningSet` holds those counts for one `PolicyEngine`. Admission costs O(number of the label's
CW types) and start/stop O(size of the label's conflict sets): never a scan of the running
domains. A full recount (`rebuild`) is only for a policy change.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from shyped.policy.decisions import (
    Decision,
    Hook,
    LabelInput,
    PolicyEngine,
    Rule,
    UnknownLabelError,
    fmt_names,
)
from shyped.policy.model import VmLabel


class NotRunningError(ValueError):
    """`stop` for a label with no running domain: the caller's model is out of step."""


class RunningSet:
    """Per-type Chinese Wall counts of the running domains under one policy engine. Mutable."""

    __slots__ = (
        "_blocked",
        "_blocked_in_set",
        "_denies",
        "_engine",
        "_labels",
        "_permits",
        "_types",
    )

    def __init__(self, engine: PolicyEngine) -> None:
        self._engine = engine
        self._blocked: Counter[str] = Counter()  # CW type -> block count (ACM aggregate set)
        self._blocked_in_set: Counter[tuple[str, str]] = Counter()  # (set, type) -> count
        self._types: Counter[str] = Counter()  # CW type -> running domains carrying it
        self._labels: Counter[str] = Counter()  # VM label name -> running domains
        self._permits: dict[LabelInput, Decision] = {}  # per label input, all permits alike
        self._denies: dict[LabelInput, Decision] = {}  # valid until the counts change

    # ---------------------------------------------------------------- queries

    @property
    def engine(self) -> PolicyEngine:
        return self._engine

    def __len__(self) -> int:
        """Number of running domains counted."""
        return self._labels.total()

    def running_labels(self) -> Mapping[str, int]:
        """VM label name -> number of running domains with it (a copy)."""
        return {name: n for name, n in self._labels.items() if n}

    def blocked_types(self) -> Mapping[str, int]:
        """CW type -> block count, non-zero entries only (a copy)."""
        return {t: n for t, n in self._blocked.items() if n}

    def admit(self, label: LabelInput) -> Decision:
        """May a domain labelled `label` start now? Does not change the counts."""
        try:
            lab = self._engine.resolve_domain(label)
        except UnknownLabelError as e:
            raw = None if label is None else str(label)
            return Decision(False, Hook.DOMAIN_ADMIT, e.rule, e.reason, raw)
        blocked = self._blocked
        for t in lab.cw_types:
            if blocked[t]:
                hit = self._denies.get(label)
                if hit is None:
                    if len(self._denies) >= 1 << 16:
                        self._denies.clear()
                    hit = self._denies[label] = self._deny(label, lab)
                return hit
        hit = self._permits.get(label)
        if hit is None:
            hit = self._permit(label, lab)
        return hit

    # ---------------------------------------------------------------- updates

    def start(self, label: LabelInput) -> None:
        """Count a domain with `label` as running (after admission, or when reconciling).

        Raises `UnknownLabelError` if the label does not resolve; nothing changes then.
        """
        self._add(self._engine.resolve_domain(label), 1)

    def try_start(self, label: LabelInput) -> Decision:
        """Admit and, if permitted, count the domain in one step (ACM's pre-create hook)."""
        d = self.admit(label)
        if d.permitted:
            self.start(label)
        return d

    def stop(self, label: LabelInput) -> None:
        """Uncount a domain with `label` once it is finally gone (not at a shutdown request)."""
        lab = self._engine.resolve_domain(label)
        if not self._labels[lab.name]:
            raise NotRunningError(f"no running domain with label {lab.name!r} to stop")
        self._add(lab, -1)

    def admit_relabel(self, old: LabelInput, new: LabelInput) -> Decision:
        """May a running domain labelled `old` be relabelled `new`? Counts are unchanged after."""
        self.stop(old)
        try:
            return self.admit(new)
        finally:
            self.start(old)

    def relabel(self, old: LabelInput, new: LabelInput) -> None:
        """Move one running domain from `old` to `new` (after `admit_relabel` permitted it)."""
        lab_new = self._engine.resolve_domain(new)
        self.stop(old)
        self._add(lab_new, 1)

    def rebuild(self, engine: PolicyEngine, labels: Iterable[LabelInput]) -> None:
        """Recount from scratch under `engine` (policy change). All or nothing.

        Raises `UnknownLabelError` naming every label that does not resolve under the new
        engine; the set is then left exactly as it was.
        """
        resolved: list[VmLabel] = []
        bad: list[str] = []
        for label in labels:
            try:
                resolved.append(engine.resolve_domain(label))
            except UnknownLabelError as e:
                bad.append(e.reason)
        if bad:
            raise UnknownLabelError("; ".join(dict.fromkeys(bad)), Rule.LABEL)
        self._engine = engine
        self._blocked = Counter()
        self._blocked_in_set = Counter()
        self._types = Counter()
        self._labels = Counter()
        self._permits = {}
        self._denies = {}
        for lab in resolved:
            self._add(lab, 1)

    # ---------------------------------------------------------------- internals

    def _add(self, lab: VmLabel, n: int) -> None:
        if self._denies:
            self._denies.clear()  # a deny's reason names the running types: recompute
        for pair in self._engine.cw_blocks(lab):
            self._blocked_in_set[pair] += n
            self._blocked[pair[1]] += n
        for t in lab.cw_types:
            self._types[t] += n
        self._labels[lab.name] += n

    def _permit(self, label: LabelInput, lab: VmLabel) -> Decision:
        desc = self._engine.describe_domain(label)
        if lab.cw_types:
            reason = f"{desc} may start: none of its Chinese Wall types is blocked"
        else:
            reason = f"{desc} may start: it has no Chinese Wall types"
        d = Decision(
            True, Hook.DOMAIN_ADMIT, Rule.CHINESE_WALL, reason, lab.name, cw_types=lab.cw_types
        )
        if len(self._permits) >= 1 << 16:
            self._permits.clear()
        self._permits[label] = d
        return d

    def _deny(self, label: LabelInput, lab: VmLabel) -> Decision:
        # Off the hot path: explain with the policy's conflict sets and the running type counts.
        desc = self._engine.describe_domain(label)
        policy = self._engine.policy
        blocked = sorted(t for t in lab.cw_types if self._blocked[t])
        t = blocked[0]
        cset = next(cs for cs in policy.conflict_sets_of(t) if self._blocked_in_set[(cs.name, t)])
        rivals = sorted(u for u in cset.types if u != t and self._types[u])
        more = f" (also blocked: {fmt_names(blocked[1:])})" if len(blocked) > 1 else ""
        reason = (
            f"{desc} may not start: Chinese Wall type {t!r} conflicts with running type "
            f"{fmt_names(rivals)} in conflict set {cset.name!r}{more}"
        )
        return Decision(
            False,
            Hook.DOMAIN_ADMIT,
            Rule.CHINESE_WALL,
            reason,
            lab.name,
            cw_types=frozenset(blocked) | frozenset(rivals),
            conflict_set=cset.name,
        )


def running_set(engine: PolicyEngine, labels: Iterable[LabelInput] = ()) -> RunningSet:
    """A Chinese Wall running set under `engine`'s policy, counting `labels` as running."""
    rs = RunningSet(engine)
    rs.rebuild(engine, labels)
    return rs
