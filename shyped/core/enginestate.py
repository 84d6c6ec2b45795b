"""The engine's state between questions: its policy, label store and mode, and the count.

`EngineState` is what `shyped.core.engine.Engine` decides with: the `PolicyEngine`, the label
store, the mode and domain veto, and the Chinese Wall count (which label each running domain is
counted with, the instances of dynamic labels, the labels published for running domains). It
keeps the count through sweeps, policy switches and relabels. Pure, like the engine.

Chinese Wall bookkeeping: `Engine` keeps which label each counted domain runs with. After a
policy switch or a switch to enforcing mode the daemon re-asks every question (`sweep`): the
count is rebuilt from the domains the host model holds as running (admitted or paused), which
are re-admitted first, then the rest are decided against them, as ACM's
``chwall_init_state`` replays the running domains.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import attrs

from shyped.core import quota
from shyped.core.audit import Party
from shyped.core.host import HostModel
from shyped.core.hostfacts import Domain, DomainState
from shyped.core.instances import Instance, Instances, dynamic_label
from shyped.core.labelstore import LabelStore
from shyped.core.modes import DomainVeto, Mode
from shyped.core.outcome import _party
from shyped.core.running import _as_is, adapt_running_system
from shyped.policy import update
from shyped.policy.chinese_wall import RunningSet, running_set
from shyped.policy.decisions import PolicyEngine, UnknownLabelError
from shyped.policy.model import LabelRef

#: Host states whose domains are running as far as the policy is concerned.
_RUNNING = frozenset({DomainState.ADMITTED, DomainState.PAUSED})


class EngineState:
    """One policy, label store and mode, and the Chinese Wall count kept under them."""

    def __init__(
        self,
        policy: PolicyEngine,
        labels: LabelStore,
        *,
        mode: Mode = Mode.ENFORCING,
        domain_veto: DomainVeto = DomainVeto.DESTROY,
        resolve: Callable[[str], str] | None = None,
    ) -> None:
        self._policy = policy
        #: Resource id -> the id of what it names now (the daemon passes
        #: `shyped.core.labelstore.resolve_resource`, which follows symlinks; pure callers: as is).
        self.resolve: Callable[[str], str] = resolve or _as_is
        self._running: RunningSet = running_set(policy)
        self._counted = quota.CountedLabels()
        #: instances of dynamic labels, claimed at admission (`shyped.core.instances`)
        self._instances = Instances()
        #: label strings published for running domains, read at reconcile (`remember_published`)
        self._published: dict[int, str] = {}
        #: During a sweep: the domains re-admitted so far (max_domains counts only those).
        self._swept: set[int] | None = None
        #: Places held for incoming domains (pool mode's granted reservations, set by
        #: `shyped.service.poolreserve`): UUID -> label. Any other domain is admitted as if
        #: they ran (Chinese Wall and max_domains); the holder's own UUID takes its place.
        self.held: Mapping[str, str] = {}
        self.labels = labels
        self.mode = mode
        self.domain_veto = domain_veto
        # dom0 runs from the start and counts in the Chinese Wall like any running domain
        # (ACM's chwall_init_state counted it): with the label an operator gave it (label
        # store, kept across restarts) if that resolves, else the bootstrap label.
        dom0 = self._resolve(labels.dom0) if labels.dom0 is not None else None
        if dynamic_label(policy.policy, dom0) is not None:
            dom0 = None  # dom0 is never an instance (a dynamic label cannot be bootstrap)
        self._counted[0] = dom0 or policy.policy.bootstrap
        self._rebuild()

    # ---- state --------------------------------------------------------------------------

    @property
    def policy(self) -> PolicyEngine:
        return self._policy

    @property
    def running(self) -> RunningSet:
        """The Chinese Wall counts (read them; the engine changes them)."""
        return self._running

    def counted(self) -> dict[int, str]:
        """domid -> label name of every guest counted in the Chinese Wall set (a copy; dom0,
        always counted, with `dom0_label`, is left out)."""
        return {d: label for d, label in self._counted.items() if d != 0}

    def dom0_label(self) -> str:
        """The label dom0 runs with: the bootstrap label unless an operator relabelled it."""
        return self._counted.get(0, self._policy.policy.bootstrap)

    def label_string(self, name: str) -> str:
        return self._policy.policy.label_string(name)

    def instance_of(self, domid: int) -> Instance | None:
        """The instance `domid` runs as (a dynamic label), or None."""
        return self._instances.get(domid)

    def _party(self, dom: Domain | None, domid: int) -> Party:
        inst = self._instances.get(domid)
        party = _party(dom, domid)
        return party if inst is None else attrs.evolve(party, instance=inst.name)

    def _keep_instances(self) -> None:
        """Give up the instances of domains no longer counted with a dynamic label."""
        policy = self._policy.policy
        self._instances.retain(lambda d: dynamic_label(policy, self._counted.get(d)))

    def remember_published(self, published: Mapping[int, str]) -> None:
        """Labels the daemon published for running domains (``/local/domain/<d>/shyped/label``,
        dom0-owned, read at reconcile): a domain asked about for the first time since start
        is decided with the label it was admitted with, not looked up again by a name or UUID
        that may have changed since (``xl rename`` while the daemon was down must not relabel
        a running domain behind the relabel checks). Only labels of the current policy count;
        a node of an older policy falls back to the label store."""
        self._published = {
            domid: text
            for domid, text in published.items()
            if text.startswith("ACM:") and self._resolve(text) is not None
        }

    def _resolve(self, label: str | None) -> str | None:
        try:
            return self._policy.resolve_domain(label).name
        except UnknownLabelError:
            return None

    # ---- policy changes and sweeps ------------------------------------------------------

    def _rebuild(self) -> None:
        self._running = running_set(self._policy, self._counted.values())

    def begin_sweep(self, host: HostModel) -> None:
        """Before every question is asked again: count only the domains the host model holds
        as running (they are re-admitted first); the others are decided against them."""
        self._counted = quota.CountedLabels(
            {
                d: label
                for d, label in self._counted.items()
                if (dom := host.domain(d)) is not None and dom.state in _RUNNING
            }
        )
        self._swept = set()
        self._keep_instances()
        self._rebuild()

    def end_sweep(self) -> None:
        """Every question of the sweep has been asked again."""
        self._swept = None

    def running_system(self, host: HostModel) -> update.RunningSystem:
        """The host's running system as `shyped.policy.update` wants it (resource labels from
        the label store)."""
        return adapt_running_system(
            host.running_system(), self.labels, self._counted, resolve=self.resolve
        )

    def switch_policy(self, policy: PolicyEngine, check: update.UpdateCheck) -> None:
        """Take `policy` (an allowed `check` from the current one): carry every counted
        domain's label over (``from=`` renames followed) and recount."""
        counted: dict[int, str] = {}
        for d, old in self._counted.items():
            ref = check.domain_labels.get(d, _MISSING)
            if isinstance(ref, LabelRef):
                counted[d] = ref.label
            elif ref is _MISSING and old in check.maps.vm:
                counted[d] = check.maps.vm[old]
        self._policy = policy
        self._counted = quota.CountedLabels(
            {d: label for d, label in counted.items() if self._resolve(label) is not None}
        )
        if dynamic_label(policy.policy, self._counted.get(0)) is not None:
            del self._counted[0]  # dom0 is never an instance: back to the bootstrap label
        self._counted.setdefault(0, policy.policy.bootstrap)
        self._keep_instances()
        self._rebuild()

    def relabel(self, domid: int, label: str) -> None:
        """Count running domain `domid` with `label` from now on (after an allowed
        `shyped.core.relabel.check_domain_relabel`); a domain not counted starts being counted."""
        name = self._policy.resolve_domain(label).name
        old = self._counted.get(domid)
        if old is None:
            self._running.start(name)
        else:
            self._running.relabel(old, name)
        self._counted[domid] = name
        self._keep_instances()


_MISSING = LabelRef("-", "-")
