"""What the daemon does about a decision: pure action values, and the xenstore paths they touch.

The engine (`shyped.core.engine`) turns decisions into these values; the enforcer
(`shyped.service.enforcer`) carries them out through the xenstore gateway and the toolstack
actuator.
Keeping them plain data lets tests check *what* would be done without a xenstored, and lets
audit/metrics listeners see the planned actions before anything happens.

Paths follow libxl 4.17 (``tools/libs/light/libxl_device.c``: ``libxl__device_frontend_path``,
``libxl__device_backend_path``, ``libxl__device_libxl_path``) so that a veto removes exactly
what ``libxl__device_destroy`` would.
"""

from __future__ import annotations

from typing import Final

import attrs

from shyped.core.events import DeviceKey, frontend_dir
from shyped.core.modes import DomainVeto

#: The one node the daemon writes per domain, relative to ``/local/domain/<domid>``.
LABEL_DIR: Final = "shyped"
LABEL_KEY: Final = "label"


def label_dir(domid: int) -> str:
    """``/local/domain/<domid>/shyped``: owned by dom0, readable by the guest."""
    return f"/local/domain/{domid}/{LABEL_DIR}"


def label_node(domid: int) -> str:
    """``/local/domain/<domid>/shyped/label`` = ``ACM:<policy>:<label>``."""
    return f"{label_dir(domid)}/{LABEL_KEY}"


def label_perms(domid: int) -> tuple[str, ...]:
    """Owner dom0 (nobody else may write), the domain itself may read: ``n0,r<domid>``."""
    return ("n0",) if domid == 0 else ("n0", f"r{domid}")


@attrs.frozen
class WriteLabel:
    """Publish the label a domain runs with (both modes: a fact, not a veto).

    `uuid` guards against a domid reused meanwhile: the enforcer writes only if
    ``/local/domain/<domid>/vm`` still names ``/vm/<uuid>`` (None: domain 0, no check).
    """

    domid: int
    uuid: str | None
    label: str  # ACM:<policy>:<label>

    @property
    def path(self) -> str:
        return label_node(self.domid)

    def describe(self) -> str:
        return f"write {self.path} = {self.label!r}"


@attrs.frozen
class VetoDomain:
    """Destroy (or pause) a domain refused admission, through the toolstack actuator."""

    domid: int
    how: DomainVeto

    def describe(self) -> str:
        return f"{self.how.value} domain {self.domid}"


@attrs.frozen
class CutDevice:
    """Cut a PV device's handshake, then remove it (see docs/operations.md).

    1. one transaction: the frontend directory (and what is below it) becomes readable by the
       frontend only, backend ``online`` = 0, backend ``state`` = 5 (Closing) unless Closed;
    2. wait (bounded) for the backend to reach 6 (Closed);
    3. one transaction removing the frontend, ``/libxl`` and backend directories with
       libxl's path clean-up (empty parents go too).
    """

    device: DeviceKey
    backend: int
    backend_kind: str

    @property
    def frontend_dir(self) -> str:
        return frontend_dir(self.device)

    @property
    def backend_dir(self) -> str:
        d = self.device
        return f"/local/domain/{self.backend}/backend/{self.backend_kind}/{d.frontend}/{d.devid}"

    @property
    def libxl_dir(self) -> str:
        d = self.device
        return f"/libxl/{d.frontend}/device/{d.kind}/{d.devid}"

    def describe(self) -> str:
        d = self.device
        return f"cut {d.kind} {d.frontend}/{d.devid} (backend domain {self.backend})"


@attrs.frozen
class RemoveVchan:
    """Remove a vchan rendezvous directory (its ``ring-ref`` and ``event-channel``)."""

    server: int
    path: str

    def describe(self) -> str:
        return f"remove vchan rendezvous {self.path}"


@attrs.frozen
class ResetPerms:
    """Make a shared guest-owned node reachable by its owner only (``n<owner>``).

    The owner keeps the node and its value (and may set permissions again: that fires the
    watch and is decided again); nothing changes if the node's owner is no longer `owner`.
    """

    owner: int
    path: str

    def describe(self) -> str:
        return f"reset permissions of {self.path} to n{self.owner}"


@attrs.frozen
class RemoveNode:
    """Remove a node (and what is below it) that could not be tracked (over a limit)."""

    owner: int
    path: str

    def describe(self) -> str:
        return f"remove {self.path}"


Action = WriteLabel | VetoDomain | CutDevice | RemoveVchan | ResetPerms | RemoveNode

#: Actions that take something away from a guest (the rest only publish facts).
VETO_ACTIONS: Final = (VetoDomain, CutDevice, RemoveVchan, ResetPerms, RemoveNode)


def is_veto(action: Action) -> bool:
    return isinstance(action, VETO_ACTIONS)
