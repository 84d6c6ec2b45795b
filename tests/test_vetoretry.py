"""The pending-veto retrier on a `task.Clock`: capped jittered backoff, retried until done or
the domain is gone, a bounded number of audit records (issue 11, finding 5)."""

from __future__ import annotations

from twisted.internet import defer, task

from shyped.core.actions import VetoDomain
from shyped.service.config import DomainVeto
from shyped.service.vetoretry import CAP, VetoAttempt, VetoRetrier, backoff, worth_recording


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    assert [backoff(n, lambda: 0.0) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert [backoff(n, lambda: 1.0) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    assert backoff(10_000, lambda: 1.0) == CAP and backoff(10_000, lambda: 0.0) == CAP / 2


def test_a_veto_failing_forever_is_retried_forever_with_a_bounded_record() -> None:
    clock = task.Clock()
    runs: list[VetoDomain] = []
    attempts: list[VetoAttempt] = []
    retrier = VetoRetrier(clock, lambda a: runs.append(a) or defer.succeed(None))
    retrier.on_attempt = attempts.append
    veto = VetoDomain(7, DomainVeto.DESTROY)
    retrier.failed(veto, "xl: busy")
    for _ in range(1000):  # each run fails again
        clock.advance(CAP)
        assert runs and runs[-1] == veto
        retrier.failed(veto, "xl: busy")
    assert len(runs) == 1000 and retrier.failures == 1001
    assert retrier.pending[7].failures == 1001
    recorded = [a for a in attempts if worth_recording(a)]
    assert [a.failures for a in recorded] == [1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512]
    retrier.gone(7)
    assert not retrier.pending and attempts[-1].result == "gone"
    assert worth_recording(attempts[-1])
    clock.advance(CAP)
    assert len(runs) == 1000  # nothing after the domain is gone


def test_a_pending_veto_is_dropped_once_the_domain_is_no_longer_denied() -> None:
    clock = task.Clock()
    wanted = {"yes": True}
    runs: list[VetoDomain] = []
    retrier = VetoRetrier(
        clock, lambda a: runs.append(a) or defer.succeed(None), wanted=lambda _: wanted["yes"]
    )
    retrier.failed(VetoDomain(3, DomainVeto.PAUSE), "xl: busy")
    wanted["yes"] = False  # e.g. re-admitted after a policy reload, or permissive mode
    clock.advance(CAP)
    assert runs == [] and not retrier.pending
