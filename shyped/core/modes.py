"""The daemon's two settings the pure engine decides with (read from the configuration by
`shyped.service.config`)."""

from __future__ import annotations

from enum import Enum


class Mode(Enum):
    """Whether vetoes are carried out (`enforcing`) or only decided and logged (`permissive`)."""

    ENFORCING = "enforcing"
    PERMISSIVE = "permissive"


class DomainVeto(Enum):
    """What a denied domain admission does to the domain."""

    DESTROY = "destroy"
    PAUSE = "pause"
