"""The proxier: applies pending changes and computes the desired listeners per Service.

``sync()`` is what the sync runner calls.  It takes the recorder's pending changes, folds
them into the applied state (Services, EndpointSlices by Service, the own Node), and for
each Service the changes touch it computes the listeners it wants: one per (ServicePort,
cluster IP), each with the endpoints the selection rules allow for ClusterIP traffic.  Only
Services whose wanted listeners differ from the last sync are handed to the listener set,
so a change that does not alter the result causes no churn at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from userproxy.balancers.registry import BalancerRegistry
from userproxy.control.endpoints import build_endpoints
from userproxy.control.selection import categorize
from userproxy.control.trackers import ChangeRecorder, PendingChanges, SliceKey
from userproxy.model import (
    AddressKind,
    EndpointSlice,
    IPFamily,
    ListenerSpec,
    Node,
    PoolSpec,
    Service,
    ServiceKey,
)

log = logging.getLogger(__name__)


class ListenerApplier(Protocol):
    """What the proxier drives (``userproxy.dataplane.listeners.ListenerSet``)."""

    def apply(self, service: ServiceKey, specs: Sequence[ListenerSpec]) -> None: ...


@dataclass(slots=True)
class SyncStatus:
    """What the last syncs did; read by health checks, metrics and the status page."""

    syncs: int = 0
    last_sync_at: float | None = None  # monotonic
    last_duration: float = 0.0
    last_queued_at: float | None = None  # monotonic time the applied changes were queued
    services_changed: int = 0
    slices_changed: int = 0
    #: Wall-clock delays from a slice's last-change-trigger-time to it being applied.
    programming_delays: list[float] = field(default_factory=list)


class Proxier:
    def __init__(
        self,
        recorder: ChangeRecorder,
        listeners: ListenerApplier,
        registry: BalancerRegistry,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_synced: Callable[[SyncStatus], None] | None = None,
    ) -> None:
        self.recorder = recorder
        self.listeners = listeners
        self.registry = registry
        self.node_name = recorder.node_name
        self._clock = clock
        self._wall_clock = wall_clock
        self._on_synced = on_synced
        self.services: dict[ServiceKey, Service] = {}
        self.slices: dict[ServiceKey, dict[SliceKey, EndpointSlice]] = {}
        self.node: Node | None = None
        self.specs: dict[ServiceKey, tuple[ListenerSpec, ...]] = {}
        self.status = SyncStatus()
        # Trigger times older than the proxy describe changes some earlier process applied
        # (kube-proxy ignores those too); they would report hours of "latency" per restart.
        self._started_wall = wall_clock()

    def sync(self) -> None:
        """Apply everything pending.  Does nothing until both initial listings are in."""
        if not self.recorder.initialized:
            return
        started = self._clock()
        changes = self.recorder.take()
        affected = self._fold(changes)
        for key in sorted(affected, key=str):
            specs = self.listener_specs(key)
            if specs != self.specs.get(key, ()):
                self.listeners.apply(key, specs)
                if specs:
                    self.specs[key] = specs
                else:
                    self.specs.pop(key, None)
        status = self.status
        status.syncs += 1
        status.last_sync_at = self._clock()
        status.last_duration = status.last_sync_at - started
        status.last_queued_at = changes.queued_at
        status.services_changed = len(changes.services)
        status.slices_changed = len(changes.slices)
        now = self._wall_clock()
        status.programming_delays = [
            max(0.0, now - t) for t in changes.trigger_times if t > self._started_wall
        ]
        if affected:
            log.debug(
                "sync %d: %d services, %d slices changed, %d services re-planned in %.1f ms",
                status.syncs,
                status.services_changed,
                status.slices_changed,
                len(affected),
                status.last_duration * 1000,
            )
        if self._on_synced is not None:
            self._on_synced(status)

    def _fold(self, changes: PendingChanges) -> set[ServiceKey]:
        """Fold ``changes`` into the applied state; return the Services to re-plan."""
        affected: set[ServiceKey] = set()
        for key, change in changes.services.items():
            affected.add(key)
            if change.current is None:
                self.services.pop(key, None)
            else:
                self.services[key] = change.current
        for slice_key, slice_change in changes.slices.items():
            if slice_change.previous is not None:
                owner = slice_change.previous.service_key
                affected.add(owner)
                by_name = self.slices.get(owner)
                if by_name is not None:
                    by_name.pop(slice_key, None)
                    if not by_name:
                        del self.slices[owner]
            if slice_change.current is not None:
                owner = slice_change.current.service_key
                affected.add(owner)
                self.slices.setdefault(owner, {})[slice_key] = slice_change.current
        if changes.node is not None:
            self.node = changes.node.current
            affected.update(self.services, self.specs)
        if self.status.syncs == 0:
            affected.update(self.services)
        return affected

    def listener_specs(self, key: ServiceKey) -> tuple[ListenerSpec, ...]:
        """The listeners Service ``key`` wants now (empty when it is gone or not proxied)."""
        service = self.services.get(key)
        if service is None or not service.is_proxied:
            return ()
        endpoints = build_endpoints(service, self._slices_of(key), self.node_name)
        zone = self.node.zone if self.node is not None else None
        balancer = self.registry.resolve(service.balancer, str(key))
        specs: list[ListenerSpec] = []
        for port in service.ports:
            spn = service.port_name(port)
            for ip in service.cluster_ips:
                family = IPFamily.of(ip)
                sets = categorize(endpoints.get((spn, family), ()), service, self.node_name, zone)
                pool = PoolSpec(sets.internal, balancer, service.affinity_timeout)
                specs.append(ListenerSpec(spn, AddressKind.CLUSTER_IP, ip, port.port, pool))
        return tuple(specs)

    def _slices_of(self, key: ServiceKey) -> Iterable[EndpointSlice]:
        return self.slices.get(key, {}).values()
