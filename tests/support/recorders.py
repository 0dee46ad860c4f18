"""Recorders: stand-ins for what the control plane is given, remembering every call.

``RecordingEffects`` is the proxier's ``SyncEffects``: it records each ``set_listeners``,
keeps the last specs set per Service, and raises for the Services a test breaks (as a
listener set out of descriptors would), after recording; it also keeps every health-check
hand-over and every sync's status.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from userproxy.control.proxier import NoEffects, SyncStatus
from userproxy.model import ListenerSpec, ServiceKey


@dataclass
class RecordingEffects(NoEffects):
    """``SyncEffects`` that remember every call and fail where told to."""

    calls: list[tuple[ServiceKey, tuple[ListenerSpec, ...]]] = field(default_factory=list)
    #: The specs last set without error, per Service.
    applied: dict[ServiceKey, tuple[ListenerSpec, ...]] = field(default_factory=dict)
    #: Services whose ``set_listeners`` raises this error.
    broken: dict[ServiceKey, Exception] = field(default_factory=dict)
    #: Each health-check hand-over: (ports by Service, local endpoints by Service).
    health: list[tuple[dict[ServiceKey, int], dict[ServiceKey, int]]] = field(default_factory=list)
    statuses: list[SyncStatus] = field(default_factory=list)

    def set_listeners(self, service: ServiceKey, specs: Sequence[ListenerSpec]) -> None:
        self.calls.append((service, tuple(specs)))
        error = self.broken.get(service)
        if error is not None:
            raise error
        self.applied[service] = tuple(specs)

    def sync_health_checks(
        self, ports: Mapping[ServiceKey, int], local: Mapping[ServiceKey, int]
    ) -> bool:
        self.health.append((dict(ports), dict(local)))
        return True

    def synced(self, status: SyncStatus) -> None:
        self.statuses.append(status)

    @property
    def keys(self) -> list[ServiceKey]:
        """The Services set, in call order."""
        return [key for key, _ in self.calls]

    def take(self) -> dict[ServiceKey, tuple[ListenerSpec, ...]]:
        """The calls since the last take, by Service (one call per Service per sync)."""
        calls, self.calls = self.calls, []
        result = dict(calls)
        assert len(result) == len(calls), "one set_listeners per Service per sync"
        return result
