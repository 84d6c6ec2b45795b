"""The enforcer: carries out the engine's actions through the xenstore gateway and the toolstack.

Edge code (reactor thread). Every action of one subject (a domain, a device, a vchan) runs in
order, after the Deferred the daemon passes as a gate (audit listeners that must have written
their record before a veto is carried out); different subjects proceed independently. A
failure is logged and counted, never raised into the event path.

What each action does to xenstore (docs/operations.md has the operator's version):

* `WriteLabel`: one transaction that checks ``/local/domain/<d>/vm`` still names the domain's
  ``/vm/<uuid>`` (a domid reused meanwhile gets nothing), then writes
  ``/local/domain/<d>/shyped/label`` = ``ACM:<policy>:<label>`` with permissions ``n0,r<d>`` on
  the node and its directory: dom0 owns it, the guest may read it, nobody else sees it.
* `VetoDomain`: the toolstack actuator's ``destroy`` (libxl removes every device and the
  domain's trees) or ``pause``.
* `CutDevice`, as ``xl block-detach``/``network-detach`` do (libxl_device.c
  ``libxl__initiate_device_generic_remove`` then ``libxl__device_destroy``), plus revoking the
  backend's read access to the frontend: one transaction sets the permissions of the frontend
  directory and of every node below it (xenstored checks permissions per node, not per
  subtree) to ``n<frontend>`` (the guest keeps ownership, so its driver can still write
  ``state`` = Closed; nobody else may read), and writes backend ``online`` = 0 and, unless it is
  already Closed, ``state`` = 5 (Closing). A backend driver (netback/blkback
  ``frontend_changed``/``backend_changed``) reacts by closing. The enforcer waits for backend
  ``state`` = 6 (Closed) up to ``close_timeout`` (libxl waits 10 s, then forces), then removes
  the frontend, ``/libxl`` and backend directories in one transaction with libxl's path
  clean-up (``libxl__xs_path_cleanup``: empty parents without a value go too).
  Fail closed where the guest could outrun the revoke (it owns its frontend nodes): a frontend
  directory with more than `MAX_FRONTEND_NODES` nodes is removed at once in that transaction,
  and while the cut waits every watch event below it (`Enforcer.touched`) re-checks it: a node
  that grants anyone again, or too many nodes, and it is removed at once. The guest cannot make
  it again (``device/<kind>`` is dom0's); the backend sees its frontend gone and closes.
* `RemoveVchan`: removes the rendezvous directory (``ring-ref`` and ``event-channel``), as the
  server's ``libxenvchan_close`` would.
* `ResetPerms` (a denied ``xs-channel``): one transaction that reads the node's permissions
  and, if its owner is still the guest the decision was about, sets them to ``n<owner>``: the
  guest keeps its node and value, no other domain may read or write it. The node keeps no
  grant, so the watch this fires decides nothing new (idempotent, no loop); a guest that
  grants again is decided again (see `Enforcer.on_changed` below).
* `RemoveNode` (a node past a tracking bound): removes the node and what is below it.

Once a `ResetPerms`, `RemoveVchan` or `RemoveNode` has run (whatever it found), the enforcer
calls `Enforcer.on_changed` with it: the daemon withdraws what it had emitted about those nodes
and reads them again (`shyped.core.assembler.EventAssembler.withdraw`). Watch events coalesce, so
without that a guest that grants again right after the reset, before the daemon reads the
node, would show the facts decided before the reset, and its new grant would stay undecided.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from shyped.core.actions import (
    Action,
    CutDevice,
    RemoveNode,
    RemoveVchan,
    ResetPerms,
    VetoDomain,
    WriteLabel,
    label_dir,
    label_perms,
)
from shyped.core.engine import Outcome
from shyped.core.events import BackendStateChanged, DeviceKey, DeviceRemoved, DomainVanished, Event
from shyped.service.actuator import ToolstackActuator
from shyped.service.config import DomainVeto
from shyped.service.cuttx import (
    MAX_FRONTEND_NODES,
    frontend_regranted,
    hotplug_nodes,
    hotplug_pending,
    parse_state,
    path_cleanup,
    revoke_frontend,
)
from shyped.service.labelwindow import LabelWindow
from shyped.service.vetoretry import VetoRetrier
from shyped.xenstore import Change, NoEntry, Op, Perm, Transaction, XenstoreGateway

_log = Logger(namespace="shyped.enforcer")

#: XenbusStateClosing / XenbusStateClosed.
CLOSING = 5
CLOSED = 6
#: Seconds between re-reads of a backend's state while a device veto waits for Closed.
RECHECK = 1.0
#: Seconds a device cut waits for the device's hotplug script to finish (libxl's own
#: LIBXL_HOTPLUG_TIMEOUT is 40 s; past it libxl has given up on the add anyway).
HOTPLUG_WAIT = 40.0
#: Times a device veto says Closing again when the backend's own writes overwrote it.
MAX_REASSERT = 3
#: Vetoes whose change to a node the daemon must learn from itself (see `Enforcer.on_changed`).
CHANGES_NODES = (ResetPerms, RemoveVchan, RemoveNode)


@attrs.define
class EnforcerStats:
    """Counters for status and metrics."""

    actions: int = 0
    failed: int = 0
    close_timeouts: int = 0
    #: Frontend directories removed at once during a cut (too many nodes, or granted again).
    frontends_removed: int = 0
    in_flight: int = 0
    #: Actions left undone because the daemon stopped (`Enforcer.stop`).
    abandoned: int = 0
    by_kind: dict[str, int] = attrs.field(factory=dict)


class Stopping(Exception):
    """The daemon stops: the action is abandoned (a restart's reconcile decides again)."""


class Enforcer:
    """Carries out `Outcome.actions`; see the module docstring for what each one writes."""

    def __init__(
        self,
        gateway: XenstoreGateway,
        actuator: ToolstackActuator,
        *,
        reactor: Any,
        close_timeout: float = 10.0,
    ) -> None:
        self.gateway = gateway
        self.actuator = actuator
        self.reactor = reactor
        self.close_timeout = close_timeout
        self.stats = EnforcerStats()
        self._chains: dict[Hashable, Deferred[None]] = {}
        self._waiters: dict[DeviceKey, list[Deferred[str]]] = {}
        #: Frontend directories of device cuts waiting for their backend: frontend domid, and
        #: whether a re-check of their permissions is due (see `touched`).
        self._cuts: dict[str, int] = {}
        self._recheck_due: set[str] = set()
        #: Domain vetoes that failed, retried until done or the domain is gone.
        self.vetoes = VetoRetrier(reactor, self._retry_veto)
        #: Called with each node veto (`CHANGES_NODES`) once it has run, before the next
        #: action of its chain and before `idle` can be true again.
        self.on_changed: Callable[[Action], None] | None = None
        self.stopping = False
        #: Seconds a cut waits for the device's hotplug script (`HOTPLUG_WAIT`).
        self.hotplug_wait = HOTPLUG_WAIT
        #: Nodes whose write ends a cut's wait for the hotplug script (`_await_hotplug`).
        self._hotplug_nodes: dict[str, DeviceKey] = {}
        self._rechecks = 0  # frontend re-checks in flight (counted in stats.in_flight too)
        self.labels = LabelWindow(reactor)  # label writes whose events are not seen yet

    # ---- public -------------------------------------------------------------------------

    def execute(self, outcome: Outcome, gate: Deferred[Any] | None = None) -> Deferred[None]:
        """Carry out the outcome's actions in order, after `gate` and after anything still
        running for the same subject. The Deferred never fails."""
        if not outcome.actions:
            return defer.succeed(None)
        return self._chain((outcome.kind, outcome.need.key), outcome.actions, outcome.what, gate)

    def execute_action(self, action: Action) -> Deferred[None]:
        """One action outside a decision (dom0's label at start and after a reload)."""
        return self._chain(("action", action), (action,), action.describe(), None)

    def _retry_veto(self, action: VetoDomain) -> Deferred[None]:
        """Run a pending veto again, in order with anything else about that domain."""
        return self._chain(("domain", action.domid), (action,), f"domain {action.domid}", None)

    def _chain(
        self, key: Hashable, actions: tuple[Action, ...], what: str, gate: Deferred[Any] | None
    ) -> Deferred[None]:
        previous = self._chains.get(key)
        waits: list[Deferred[Any]] = [d for d in (previous, gate) if d is not None]
        start: Deferred[Any] = (
            defer.DeferredList(waits, consumeErrors=True) if waits else defer.succeed(None)
        )
        self.stats.in_flight += 1

        def run(_: object) -> Deferred[None]:
            return Deferred.fromCoroutine(self._run_all(actions, what))

        d: Deferred[None] = start.addCallback(run)

        def done(_: object) -> None:
            self.stats.in_flight -= 1
            if self._chains.get(key) is d:
                del self._chains[key]

        d.addBoth(done)
        self._chains[key] = d
        return d

    def stop(self) -> int:
        """The daemon stops: nothing more is started, a device cut waiting for its backend
        gives up now, and what fails from here on (the connection closes) is counted as
        abandoned, not logged. Returns the action chains in flight (the daemon logs them)."""
        self.stopping = True
        self.labels.close()
        # Counted before the wakes: a cut woken here may end (Stopping) at once, which would
        # take it off the count it belongs to.
        in_flight = self.stats.in_flight - self._rechecks
        self.vetoes.stop()
        for key in list(self._waiters):
            self._wake(key, "stopping")
        return in_flight

    def observe(self, event: Event) -> None:
        """Events from the daemon's stream that end a wait for a backend to close."""
        if isinstance(event, BackendStateChanged):
            if event.state is None or event.state >= CLOSED:
                self._wake(event.device, "closed")
            elif event.state < CLOSING:
                self._wake(event.device, "reopened")
        elif isinstance(event, DeviceRemoved):
            self._wake(event.device, "removed")
        elif isinstance(event, DomainVanished):
            self.vetoes.gone(event.domid)
            for key in [k for k in self._waiters if k.frontend == event.domid]:
                self._wake(key, "domain gone")

    def touched(self, path: str) -> None:
        """A watch event (raw path, before the daemon reads anything): if it is below the
        frontend directory of a cut waiting for its backend, check that directory again. The
        guest owns its frontend nodes and may grant the backend read access again during the
        wait; the daemon leaves device-directory grants to the device hook, so the enforcer
        itself must not let the revoke be undone (see `_recheck_frontend`). A write of a
        ``hotplug-status`` or frontend ``state`` a cut waits for wakes it."""
        key = self._hotplug_nodes.get(path)
        if key is not None:
            self._wake(key, "hotplug")
        for fe_dir in self._cuts:
            if path == fe_dir or path.startswith(fe_dir + "/"):
                self._schedule_recheck(fe_dir)
                return

    def _schedule_recheck(self, fe_dir: str) -> None:
        if fe_dir in self._recheck_due:
            return
        self._recheck_due.add(fe_dir)
        self.stats.in_flight += 1
        self._rechecks += 1
        d = Deferred.fromCoroutine(self._recheck_frontend(fe_dir))

        def done(result: object) -> None:
            self.stats.in_flight -= 1
            self._rechecks -= 1
            if isinstance(result, Failure) and not self.stopping:
                self.stats.failed += 1
                _log.error(
                    "enforce: re-checking {fe_dir} during its cut failed: {error}",
                    fe_dir=fe_dir,
                    error=str(result.value) or type(result.value).__name__,
                )

        d.addBoth(done)

    async def _recheck_frontend(self, fe_dir: str) -> None:
        """Fail closed on a frontend directory whose revoke the guest undid (or outgrew):
        remove it at once, as the cut would at its end. The guest cannot make it again (its
        parent ``device/<kind>`` is dom0's); the backend sees its frontend gone."""
        self._recheck_due.discard(fe_dir)  # a touch while this runs checks again
        frontend = self._cuts.get(fe_dir)
        if frontend is None:
            return

        def body(tx: Transaction) -> str | None:
            why = frontend_regranted(tx, fe_dir, frontend)
            if why is not None:
                path_cleanup(tx, fe_dir)
            return why

        why = await self.gateway.transaction(body, alone=True)
        if why is not None:
            self.stats.frontends_removed += 1
            _log.warn(
                "enforce: frontend {fe_dir} of a cut device: {why}; removed at once "
                "(the backend must not read it while the cut waits)",
                fe_dir=fe_dir,
                why=why,
            )

    def idle(self) -> bool:
        return self.stats.in_flight == 0

    # ---- running ------------------------------------------------------------------------

    async def _run_all(self, actions: tuple[Action, ...], what: str) -> None:
        for action in actions:
            if self.stopping:
                self.stats.abandoned += 1
                continue
            kind = type(action).__name__
            self.stats.actions += 1
            self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1
            try:
                await self._run(action)
            except Exception as exc:
                if self.stopping:  # the connection closes under it: not a failure to log
                    self.stats.abandoned += 1
                    continue
                self.stats.failed += 1
                if isinstance(action, VetoDomain):  # kept pending; the retrier logs it
                    self.vetoes.failed(action, str(exc) or type(exc).__name__)
                    continue
                _log.error(
                    "enforce: {action} for {what} failed: {error}",
                    action=action.describe(),
                    what=what,
                    error=str(exc) or type(exc).__name__,
                )
                continue
            if self.on_changed is not None and isinstance(action, CHANGES_NODES):
                try:
                    self.on_changed(action)
                except Exception:
                    _log.failure("enforce: on_changed for {action} raised", action=action)

    async def _run(self, action: Action) -> None:
        if isinstance(action, WriteLabel):
            await self._write_label(action)
        elif isinstance(action, VetoDomain):
            if action.how is DomainVeto.PAUSE:
                await self.actuator.pause(action.domid)
            else:
                await self.actuator.destroy(action.domid)
            _log.info("enforce: {action} done", action=action.describe())
            self.vetoes.succeeded(action)
        elif isinstance(action, CutDevice):
            await self._cut(action)
        elif isinstance(action, RemoveVchan):
            await self._remove_vchan(action)
        elif isinstance(action, ResetPerms):
            await self._reset_perms(action)
        elif isinstance(action, RemoveNode):
            await self._remove_path(action.path, action.describe(), owner=action.owner)

    async def _write_label(self, action: WriteLabel) -> None:
        d = action.domid
        perms = tuple(Perm.parse(p) for p in label_perms(d))
        vm = f"/vm/{action.uuid}".encode() if action.uuid is not None else None

        changes: list[Change] = [
            (Op.MKDIR, label_dir(d), None),
            (Op.SET_PERMS, label_dir(d), perms),
            (Op.WRITE, action.path, action.label.encode()),
            (Op.SET_PERMS, action.path, perms),
        ]

        # START, the check and the changes pipelined, END: when the domain is no longer the
        # one decided, the transaction is aborted and nothing is written. On the reactor over
        # the gateway's direct connection when it is up (no thread hop).
        check = f"/local/domain/{d}/vm" if vm is not None else None
        # within the window of label writes whose events are not seen yet (`labelwindow`)
        if not await self.labels.write(
            action.path, lambda: self.gateway.apply_if(check, vm or b"", changes)
        ):
            _log.info("enforce: domain {domid} is gone; label not written", domid=d)

    def _wait_closed(self, key: DeviceKey) -> Deferred[str]:
        d: Deferred[str] = Deferred(lambda _: self._forget(key, d))
        self._waiters.setdefault(key, []).append(d)
        return d

    def _forget(self, key: DeviceKey, d: Deferred[str]) -> None:
        waiters = self._waiters.get(key)
        if waiters is not None and d in waiters:
            waiters.remove(d)
            if not waiters:
                del self._waiters[key]

    def _wake(self, key: DeviceKey, why: str) -> None:
        for d in self._waiters.pop(key, []):
            if not d.called:
                d.callback(why)

    async def _await_hotplug(self, action: CutDevice) -> None:
        """Let the device's add finish before cutting it (`hotplug_pending`), up to
        `HOTPLUG_WAIT` seconds: a cut landing under libxl's hotplug script fails the add,
        and at ``xl create`` the whole domain with it, instead of the domain running on
        without the denied device. Nothing connects meanwhile: the guest is paused while
        libxl adds its devices, a frontend that moves on ends the wait, and netback waits
        for the script before it connects."""
        key, be_dir, fe_dir = action.device, action.backend_dir, action.frontend_dir
        nodes = hotplug_nodes(be_dir, fe_dir)
        deadline = self.reactor.seconds() + self.hotplug_wait
        for node in nodes[1:]:
            self._hotplug_nodes[node] = key
        try:
            while True:
                waiter = self._wait_closed(key)  # registered before the read: no lost wake
                try:
                    pending = hotplug_pending(await self.gateway.read_many(nodes), be_dir, fe_dir)
                except BaseException:
                    _discard(waiter)
                    raise
                remaining = deadline - self.reactor.seconds()
                if not pending or remaining <= 0:
                    _discard(waiter)
                    if pending:
                        _log.warn(
                            "enforce: {what}: the hotplug script of {be} did not finish within "
                            "{t:g} s; cutting anyway",
                            what=action.describe(),
                            be=be_dir,
                            t=self.hotplug_wait,
                        )
                    return
                waiter.addTimeout(remaining, self.reactor, onTimeoutCancel=_timed_out)
                if await waiter == "stopping":
                    raise Stopping
        finally:
            for node in nodes[1:]:
                if self._hotplug_nodes.get(node) == key:
                    del self._hotplug_nodes[node]

    async def _cut(self, action: CutDevice) -> None:
        key = action.device
        fe_dir, be_dir = action.frontend_dir, action.backend_dir
        await self._await_hotplug(action)

        def close(tx: Transaction, revoke: bool) -> tuple[int | None, int]:
            try:
                state = parse_state(tx.read(f"{be_dir}/state"))
            except NoEntry:
                state = None
            revoked, complete = revoke_frontend(tx, fe_dir, key.frontend) if revoke else (0, True)
            if not complete:
                # Fail closed: nodes past the cap would stay readable by the backend for the
                # whole wait. Remove the frontend now, as the cut's end would.
                path_cleanup(tx, fe_dir)
                revoked = -1
            if state is not None:
                tx.write(f"{be_dir}/online", b"0")
                if state not in (CLOSING, CLOSED) or (revoke and state != CLOSED):
                    tx.write(f"{be_dir}/state", str(CLOSING).encode())
            return state, revoked

        waiter = self._wait_closed(key)
        try:
            state, revoked = await self.gateway.transaction(lambda tx: close(tx, True), alone=True)
        except BaseException:
            _discard(waiter)
            raise
        if state is None:
            done = "backend gone"
        elif state == CLOSED:
            done = "backend already Closed, online=0"
        else:
            done = f"backend online=0, state {state} -> Closing"
        if revoked < 0:
            self.stats.frontends_removed += 1
            _log.warn(
                "enforce: {what}: {done}; frontend has more than {cap} nodes: removed at once",
                what=action.describe(),
                done=done,
                cap=MAX_FRONTEND_NODES,
            )
        else:
            _log.info(
                "enforce: {what}: {done}; frontend readable by domain {fe} only ({n} nodes)",
                what=action.describe(),
                done=done,
                fe=key.frontend,
                n=revoked,
            )
        self._cuts[fe_dir] = key.frontend
        try:
            # A grant made between the revoke and now fired an event nobody looked at.
            self._schedule_recheck(fe_dir)
            await self._wait_backend(key, be_dir, waiter, state, close)
        finally:
            self._cuts.pop(fe_dir, None)

        def remove(tx: Transaction) -> list[str]:
            paths = (fe_dir, action.libxl_dir, be_dir)
            return [p for p in paths if path_cleanup(tx, p)]

        removed = await self.gateway.transaction(remove, alone=True)
        _log.info(
            "enforce: {what}: removed {paths}",
            what=action.describe(),
            paths=", ".join(removed) or "nothing left",
        )

    async def _wait_backend(
        self,
        key: DeviceKey,
        be_dir: str,
        waiter: Deferred[str],
        state: int | None,
        close: Callable[[Transaction, bool], tuple[int | None, int]],
    ) -> None:
        """Wait for the backend to reach Closed, up to `close_timeout`, saying Closing again
        when its driver's probe overwrote it."""
        deadline = self.reactor.seconds() + self.close_timeout
        reasserted = 0
        while True:
            if state is None or state == CLOSED:
                _discard(waiter)
                break
            remaining = deadline - self.reactor.seconds()
            why = "timeout"
            if remaining > 0:
                # Events wake the wait at once; a re-read every RECHECK seconds covers what
                # coalesced watch events can hide (Closing overwritten before it was read).
                waiter.addTimeout(min(remaining, RECHECK), self.reactor, onTimeoutCancel=_timed_out)
                why = await waiter
                if why == "stopping":
                    raise Stopping
                if why == "timeout" and deadline - self.reactor.seconds() > 0:
                    why = await self._recheck(be_dir)
                    if why == "waiting":
                        waiter = self._wait_closed(key)
                        continue
            else:
                _discard(waiter)
            if why == "reopened" and reasserted < MAX_REASSERT:
                # The backend driver's probe (InitWait) raced with the cut and overwrote
                # Closing: say it again, as long as the wait lasts.
                reasserted += 1
                waiter = self._wait_closed(key)
                try:
                    state, _ = await self.gateway.transaction(
                        lambda tx: close(tx, False), alone=True
                    )
                except BaseException:
                    _discard(waiter)
                    raise
                continue
            if why in ("timeout", "reopened"):
                self.stats.close_timeouts += 1
                _log.warn(
                    "enforce: backend {be} did not reach Closed within {t} s; removing the "
                    "device anyway (as libxl forces after its timeout)",
                    be=be_dir,
                    t=self.close_timeout,
                )
            break

    async def _recheck(self, be_dir: str) -> str:
        try:
            state = parse_state(await self.gateway.read(f"{be_dir}/state"))
        except NoEntry:
            return "closed"
        if state is None or state >= CLOSED:
            return "closed"
        return "reopened" if state < CLOSING else "waiting"

    async def _remove_vchan(self, action: RemoveVchan) -> None:
        await self._remove_path(action.path, action.describe())

    async def _remove_path(self, path: str, what: str, owner: int | None = None) -> None:
        """Remove `path`; with `owner`, only while that domain still owns it (a node of
        dom0's or another domain's is never removed for a guest's over-limit)."""

        def body(tx: Transaction) -> bool:
            try:
                if owner is not None:
                    perms = tx.get_perms(path)
                    if not perms or perms[0].domid != owner:
                        return False
                tx.rm(path)
            except NoEntry:
                return False
            return True

        if await self.gateway.transaction(body, alone=True):
            _log.info("enforce: {action} done", action=what)

    async def _reset_perms(self, action: ResetPerms) -> None:
        only_owner = (Perm("n", action.owner),)

        def body(tx: Transaction) -> str:
            try:
                perms = tx.get_perms(action.path)
            except NoEntry:
                return "node gone"
            if not perms or perms[0].domid != action.owner:
                return "owner changed: decided again from the next watch event"
            if tuple(perms) == only_owner:
                return "already owner-only"
            tx.set_perms(action.path, only_owner)
            return "done"

        result = await self.gateway.transaction(body, alone=True)
        _log.info("enforce: {action}: {result}", action=action.describe(), result=result)


def _discard(d: Deferred[str]) -> None:
    """Cancel a wait nobody needs any more (its CancelledError is expected)."""

    def trap(f: Failure) -> Failure | None:
        return None if isinstance(f.value, defer.CancelledError) else f

    d.addErrback(trap)
    d.cancel()


def _timed_out(_result: object, _timeout: float) -> str:
    return "timeout"
