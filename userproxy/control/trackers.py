"""Change trackers and the state they fold into.

Like kube-proxy's ServiceChangeTracker and EndpointsChangeTracker, each pending change is
kept as ``(previous, current)`` where previous is the state the last sync applied and
current the newest state seen (None meaning "absent").  An add followed by a delete, or an
update back to the applied object, leaves nothing pending, so the sync that follows does
no work for it.

A sync takes the pending changes (``ChangeRecorder.take``) and folds them into the
:class:`AppliedState`, which says which Services must be planned again; upstream keeps the
same pair side by side (``ServicePortMap.Update`` and ``EndpointsMap.Update`` beside the
change trackers in pkg/proxy/servicechangetracker.go and endpointschangetracker.go).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from userproxy.model import EndpointSlice, Node, Service, ServiceKey

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Change(Generic[V]):
    previous: V | None
    current: V | None


class ChangeTracker(Generic[K, V]):
    """Pending ``Change``s per key; ``total`` counts every recorded change, even cancelled."""

    __slots__ = ("_pending", "total")

    def __init__(self) -> None:
        self._pending: dict[K, Change[V]] = {}
        self.total = 0

    def record(self, key: K, previous: V | None, current: V | None) -> bool:
        """Record one change; True when something is pending for ``key`` afterwards."""
        self.total += 1
        pending = self._pending.get(key)
        base = pending.previous if pending is not None else previous
        if base == current:
            self._pending.pop(key, None)
            return False
        self._pending[key] = Change(base, current)
        return True

    def take(self) -> dict[K, Change[V]]:
        """Hand the pending changes to a sync and start afresh."""
        pending, self._pending = self._pending, {}
        return pending

    def __len__(self) -> int:
        return len(self._pending)


SliceKey = tuple[str, str]


@dataclass(slots=True)
class PendingChanges:
    """Everything a sync takes at once (see ``ChangeRecorder.take``)."""

    services: dict[ServiceKey, Change[Service]]
    slices: dict[SliceKey, Change[EndpointSlice]]
    node: Change[Node] | None
    #: When the oldest of these changes was queued (monotonic clock), None if none.
    queued_at: float | None
    #: ``last-change-trigger-time`` of the changed slices (wall clock), for the
    #: network programming latency.
    trigger_times: list[float] = field(default_factory=list)


class ChangeRecorder:
    """Implements the source handlers by recording changes and asking for a sync.

    Invariant: ``request_sync`` is called after every change that leaves something pending
    and once both initial listings are complete; the recorder itself never touches sockets.
    """

    def __init__(
        self,
        node_name: str,
        request_sync: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.node_name = node_name
        self._request_sync = request_sync
        self._clock = clock
        self._wall_clock = wall_clock
        #: Wall-clock time of the newest change queued (kube-proxy's
        #: sync_proxy_rules_last_queued_timestamp_seconds); None before the first.
        self.last_queued_wall: float | None = None
        self.services: ChangeTracker[ServiceKey, Service] = ChangeTracker()
        self.slices: ChangeTracker[SliceKey, EndpointSlice] = ChangeTracker()
        self._node: Change[Node] | None = None
        self._node_seen: Node | None = None
        self._queued_at: float | None = None
        #: last-change-trigger-time per slice with a pending change (kube-proxy keeps these
        #: per slice too, and forgets them when the change cancels out).
        self._trigger_times: dict[SliceKey, list[float]] = {}
        self.services_synced = False
        self.slices_synced = False

    @property
    def initialized(self) -> bool:
        """Both initial listings delivered: only then may the proxy serve anything."""
        return self.services_synced and self.slices_synced

    @property
    def queued_at(self) -> float | None:
        """Monotonic time the oldest unapplied change was queued (None when all applied)."""
        return self._queued_at

    def take(self) -> PendingChanges:
        pending = PendingChanges(
            services=self.services.take(),
            slices=self.slices.take(),
            node=self._node,
            queued_at=self._queued_at,
            trigger_times=[t for times in self._trigger_times.values() for t in times],
        )
        self._node = None
        self._queued_at = None
        self._trigger_times = {}
        return pending

    def _changed(self, pending: bool) -> None:
        if not pending:
            return
        self.last_queued_wall = self._wall_clock()
        if self._queued_at is None:
            self._queued_at = self._clock()
        if self.initialized:
            self._request_sync()

    # -- Services ---------------------------------------------------------------------------
    def on_service_add(self, service: Service) -> None:
        self._changed(self.services.record(service.key, None, service))

    def on_service_update(self, old: Service, new: Service) -> None:
        self._changed(self.services.record(new.key, old, new))

    def on_service_delete(self, service: Service) -> None:
        self._changed(self.services.record(service.key, service, None))

    def on_services_synced(self) -> None:
        self.services_synced = True
        if self.initialized:
            self._request_sync()

    # -- EndpointSlices ---------------------------------------------------------------------
    def _slice_changed(self, previous: EndpointSlice | None, new: EndpointSlice | None) -> None:
        some = new or previous
        assert some is not None
        key = (some.namespace, some.name)
        pending = self.slices.record(key, previous, new)
        if pending and new is not None and new.trigger_time is not None:
            self._trigger_times.setdefault(key, []).append(new.trigger_time)
        elif not pending:
            self._trigger_times.pop(key, None)
        self._changed(pending)

    def on_endpointslice_add(self, endpoint_slice: EndpointSlice) -> None:
        self._slice_changed(None, endpoint_slice)

    def on_endpointslice_update(self, old: EndpointSlice, new: EndpointSlice) -> None:
        self._slice_changed(old, new)

    def on_endpointslice_delete(self, endpoint_slice: EndpointSlice) -> None:
        self._slice_changed(endpoint_slice, None)

    def on_endpointslices_synced(self) -> None:
        self.slices_synced = True
        if self.initialized:
            self._request_sync()

    # -- the own Node -----------------------------------------------------------------------
    def _node_changed(self, node: Node | None) -> None:
        if node is not None and node.name != self.node_name:
            return
        base = self._node.previous if self._node is not None else self._node_seen
        self._node_seen = node
        self._node = None if base == node else Change(base, node)
        self._changed(self._node is not None)

    def on_node_add(self, node: Node) -> None:
        self._node_changed(node)

    def on_node_update(self, old: Node, new: Node) -> None:
        self._node_changed(new)

    def on_node_delete(self, node: Node) -> None:
        if node.name == self.node_name:
            self._node_changed(None)

    def on_node_synced(self) -> None:
        """The node is optional (a manifest set may not describe it): nothing to wait for."""


class AppliedState:
    """The objects the syncs so far have applied: every Service, the EndpointSlices of
    each Service, and the proxy's own Node.

    Invariant: only ``fold`` changes it, and only the sync that took the changes calls it;
    the sources never touch it (they record changes, which the next sync folds).
    """

    __slots__ = ("node", "services", "slices")

    def __init__(self) -> None:
        self.services: dict[ServiceKey, Service] = {}
        self.slices: dict[ServiceKey, dict[SliceKey, EndpointSlice]] = {}
        self.node: Node | None = None

    def slices_of(self, key: ServiceKey) -> Iterable[EndpointSlice]:
        return self.slices.get(key, {}).values()

    def fold(self, changes: PendingChanges, affected: set[ServiceKey]) -> Iterator[None]:
        """Apply ``changes``, adding to ``affected`` every Service whose plan they may
        change; yields after each change (a sliced sync's chance to let the loop run).

        A Service is affected by a change to itself or to one of its EndpointSlices (the
        old owner too, when a slice moves).  A Node change affects every Service only when
        the zone changes: the zone is the one Node field planning reads (topology hints);
        the others feed the health checks (upstream's NodeTopologyConfig likewise
        re-syncs only on topology label changes).
        """
        for key, change in changes.services.items():
            affected.add(key)
            if change.current is None:
                self.services.pop(key, None)
            else:
                self.services[key] = change.current
            yield
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
            yield
        if changes.node is not None:
            old_zone = self.zone
            self.node = changes.node.current
            if self.zone != old_zone:
                affected.update(self.services)

    @property
    def zone(self) -> str | None:
        return self.node.zone if self.node is not None else None
