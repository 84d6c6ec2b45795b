"""One watch batch's reads: the pending paths of a burst, read in as few round trips as the
burst allows, handed to the assembler together (see `shyped.service.eventpath` for the whole).

A toolstack transaction fires its watch events at once (libxl's domain creation: 46 to 60), but
they may reach the reactor in more than one slice. Fed to the assembler slice by slice, a
device would be announced without the resource its libxl record names; read slice by slice,
every slice costs a round trip. So a batch *coalesces* the burst:

* The paths pending when the batch starts are read in one pipelined send: values, plus
  permissions only where the assembler uses them (`shyped.core.events.needs_perms`), and
  not at all where it would ignore the value (`shyped.core.assembler.readset`: a device's
  backend keys and libxl keys it does not judge, some 40 % of a device's reads);
  ``@introduceDomain`` / ``@releaseDomain`` are hints, not nodes, and are never read.
* The reads go on the gateway's watch-free connection when it is up
  (`shyped.xenstore.direct`): they do not queue behind a flood of watch events. Beside them
  goes a barrier on the watch connection (`XenstoreGateway.sync`): its reply comes after every
  event xenstored sent before it, so once it is in, the rest of the burst is pending too. The
  barrier is waited for at most `BURST_WAIT` seconds after the reads are in: a watch
  connection busy with a guest's flood delays this batch by that bound, never more (what
  arrives later is the next batch's). Without the direct connection the reads themselves are
  the barrier (same connection), as before.
* Paths that became pending meanwhile belong to the same burst: they are read too, up to
  `BATCH_ROUNDS` rounds, and everything is fed together. A round's reads go out as soon as
  the barrier (or, without the direct connection, the previous round's reads) is in, while
  the previous round's reads may still be in flight: rounds overlap rather than add up
  (a burst that reached the reactor in slices cost a whole extra round trip per slice).

Which paths a batch takes, and how many per guest, is `shyped.core.fairbatch`'s business; a
guest whose backlog overflowed there has its whole tree read again here (`reread_guests`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from shyped.core.assembler import EventAssembler
from shyped.core.assembler.readset import unread_paths
from shyped.core.events import Node as EventNode
from shyped.core.events import ignored_subtree, needs_perms
from shyped.core.fairbatch import FairBatches
from shyped.xenstore import Perm, XenstoreGateway

_log = Logger(namespace="shyped.daemon")

#: Read rounds one watch batch may take to pick up the rest of a burst.
BATCH_ROUNDS = 4
#: Longest wait for the watch connection's barrier once a round's reads are in (seconds).
BURST_WAIT = 0.002

#: (assembler events, the time their earliest watch event arrived), in the order to process.
Batch = list[tuple[list[Any], float]]
#: one round's reads: values and permissions
_Got = tuple[dict[str, bytes | None], dict[str, tuple[Perm, ...] | None]]


def _when_in(d: Deferred[_Got]) -> Deferred[None]:
    """Fires once `d` has (either way), leaving `d`'s result for whoever awaits it later."""
    done: Deferred[None] = Deferred()

    def passed(result: object) -> object:
        done.callback(None)
        return result

    d.addBoth(passed)
    return done


async def _all(ds: Iterable[Deferred[_Got]]) -> list[_Got]:
    """Every round's reads, in order; the first error fails the lot (the rest consumed)."""
    try:
        got: list[_Got] = await defer.gatherResults(list(ds), consumeErrors=True)
    except defer.FirstError as exc:
        exc.subFailure.raiseException()
    return got


class BatchReader:
    """Reads one batch at a time for the daemon's event path (see the module docstring)."""

    def __init__(
        self,
        gateway: XenstoreGateway,
        assembler: EventAssembler,
        reactor: Any,
    ) -> None:
        self.gateway = gateway
        self.assembler = assembler
        self.reactor = reactor
        #: rounds whose barrier did not come within `BURST_WAIT` (status, benchmarks)
        self.barrier_timeouts = 0
        #: changed paths not read because the assembler would not use them
        self.skipped = 0
        #: batches by the number of read rounds they took (benchmarks)
        self.rounds: Counter[int] = Counter()

    async def read(self, pending: FairBatches, paths: list[str], received: float) -> Batch:
        """Read `paths` taken from `pending` (and what joins the burst there meanwhile) and
        feed them to the assembler; a guest whose backlog overflowed is reconciled first."""
        out: Batch = []
        overflowed = pending.take_overflowed()
        if overflowed:
            received = min(received, *overflowed.values())
            out.append(
                (await self.reread_guests(sorted(overflowed), pending.max_waiting), received)
            )
        hints: list[str] = []
        sent: list[tuple[list[str], Deferred[_Got]]] = []
        for round_ in range(1, BATCH_ROUNDS + 1):
            hints.extend(p for p in paths if p.startswith("@"))
            reads = [p for p in paths if not p.startswith("@")]
            unused = unread_paths(set(reads))
            if unused:
                reads = [p for p in reads if p not in unused]
                self.skipped += len(unused)
            got_d = self.gateway.read_nodes(reads, [p for p in reads if needs_perms(p)])
            sent.append((reads, got_d))
            if self.gateway.direct:
                # The next round's reads go out as soon as the barrier says the burst is
                # pending, while this round's are still in flight (no round trip per round).
                if not await self._burst_end(self.gateway.sync(), got_d):
                    self.barrier_timeouts += 1
            else:
                await _when_in(got_d)  # on the watch connection the reads are the barrier
            if not pending or round_ == BATCH_ROUNDS:
                break  # what is still pending is the next batch's
            paths, earliest = pending.take()  # within what is left of the budgets
            if not paths:
                break
            if earliest is not None:
                received = min(received, earliest)
        self.rounds[round_] += 1
        values: dict[str, bytes | None] = {}
        perms: dict[str, tuple[Perm, ...] | None] = {}
        # One round (most batches): its Deferred, without gathering a list of one.
        results = [await sent[0][1]] if len(sent) == 1 else await _all(d for _, d in sent)
        for (reads, _), (got_values, got_perms) in zip(sent, results, strict=True):
            for path in reads:  # re-read paths move to the end: they are newer facts
                values.pop(path, None)
            values.update(got_values)
            perms.update(got_perms)
        nodes: list[EventNode] = [(p, None, None) for p in dict.fromkeys(hints)]
        nodes.extend((p, v, perms.get(p)) for p, v in values.items())
        out.append((self.assembler.feed_batch(nodes), received))
        return out

    def _burst_end(self, barrier: Deferred[None], reads: Deferred[_Got]) -> Deferred[bool]:
        """True once the barrier is in; False `BURST_WAIT` seconds after the reads are in
        without it (a watch connection busy with a flood). The reads' result is kept for
        whoever awaits them; the barrier's is consumed (its error is the reads' too)."""
        done: Deferred[bool] = Deferred()
        timer: list[Any] = []

        def fire(value: bool) -> None:
            if not done.called:
                done.callback(value)

        def reads_in(result: object) -> object:
            if not done.called:
                timer.append(self.reactor.callLater(BURST_WAIT, fire, False))
            return result

        def barrier_in(_: object) -> None:
            for t in timer:
                if t.active():
                    t.cancel()
            fire(True)

        reads.addBoth(reads_in)
        barrier.addBoth(barrier_in)
        return done

    async def reread_guests(self, domids: list[int], max_waiting: int) -> list[Any]:
        """Guests whose backlog of changed paths overflowed (`shyped.core.fairbatch`): their
        paths were dropped, so their whole tree is read again (a snapshot taken after the drop
        shows every change they stood for) and reconciled, as at start but for that subtree."""
        events: list[Any] = []
        for domid in domids:
            root = f"/local/domain/{domid}"
            _log.warn(
                "guest {domid} changed more than {n} paths faster than they were read: "
                "reading its tree {root} again",
                domid=domid,
                n=max_waiting,
                root=root,
            )
            scan = await self.gateway.scan(root, ignored_subtree, needs_perms)
            events.extend(self.assembler.reconcile(scan.entries, root))
        return events
