"""A restart under the same UUID read in one batch (libxl removes the old domain's home and
then creates the new one): the old incarnation's removal is announced before the new one
(tests/test_daemon_same_uuid_restart.py plays it on the daemon)."""

from __future__ import annotations

from test_events import BASE, UUID

from shyped.core.assembler import EventAssembler
from shyped.core.events import DomainAppeared, DomainVanished

OTHER = "5a0e1c9e-2a4d-4c55-9e0e-0000000000d8"


def test_the_old_incarnation_vanishes_before_the_new_one_with_its_uuid_appears() -> None:
    asm = EventAssembler()
    asm.feed_batch([(p, v, None) for p, v in BASE])  # domain 5
    gone = [("/local/domain/5", None, None), ("/libxl/5", None, None), (f"/vm/{UUID}", None, None)]
    again = [(p.replace("/5", "/6"), v, None) for p, v in BASE]
    events = [
        e for e in asm.feed_batch(gone + again) if isinstance(e, DomainAppeared | DomainVanished)
    ]
    assert events == [DomainVanished(5), DomainAppeared(6, UUID, "five")]
    assert asm.present_domains() == [0, 6]


def test_another_uuid_keeps_the_removal_last() -> None:
    asm = EventAssembler()
    asm.feed_batch([(p, v, None) for p, v in BASE])
    gone = [("/local/domain/5", None, None), ("/libxl/5", None, None), (f"/vm/{UUID}", None, None)]
    other = [
        (p.replace("/5", "/6").replace(UUID, OTHER), v.replace(UUID.encode(), OTHER.encode()), None)
        for p, v in BASE
    ]
    events = [
        e for e in asm.feed_batch(gone + other) if isinstance(e, DomainAppeared | DomainVanished)
    ]
    assert events == [DomainAppeared(6, OTHER, "five"), DomainVanished(5)]
