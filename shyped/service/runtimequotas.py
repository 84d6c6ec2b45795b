"""Run-time quotas wired to the daemon (edge code): each hypervisor metering sample
(`shyped.service.xenstat`) is judged by `shyped.core.quota.RuntimeQuotas`; a breach becomes a
denying decision (rule ``quota``) on the label's top consumer, which goes through the same
path as every other decision — log line, audit record, metrics, and in enforcing mode its
veto, a **pause** (`shyped.core.engine.Engine.runtime_veto`). docs/metrics.md, "Run-time
quotas", says which quotas act when.
"""

from __future__ import annotations

from typing import Any, Protocol

from shyped.core.accounting import account_host
from shyped.core.engine import Engine
from shyped.core.host import HostModel
from shyped.core.metering import MeterSample
from shyped.core.outcome import Outcome
from shyped.core.quota import RuntimeQuotas
from shyped.service.metrics import MetricsState


class _Core(Protocol):
    engine: Engine
    host: HostModel
    loaded: Any  # shyped.service.policyload.LoadedPolicy

    def _emit(self, outcome: Outcome, *, record: bool = True) -> None: ...


class RuntimeQuotaFeed:
    """Listens to `MetricsState.add_meter_listener` (reactor thread) for one daemon core."""

    def __init__(self, core: _Core, metrics: MetricsState, window: float) -> None:
        self._core = core
        self._metrics = metrics
        self.quotas = RuntimeQuotas(window)
        metrics.add_meter_listener(self.sample)

    def sample(self, sample: MeterSample) -> None:
        core = self._core
        breaches = self.quotas.evaluate(core.loaded.policy, sample, account_host(core.host))
        self._metrics.set_label_use(self.quotas.last_use)
        for breach in breaches:
            outcome = core.engine.runtime_veto(breach, core.host)
            if outcome is not None:
                core._emit(outcome)
