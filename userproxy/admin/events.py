"""The status page's timeline: a bounded log of what the syncs changed, in words.

``EventLog`` keeps the last ``EVENTS`` events: one per sync that changed something, one per
Service port whose count of ready endpoints changed ("default/web:http 3 -> 2 ready
endpoints"), noted by :class:`RecordingEffects` as the proxier hands each changed Service's
listeners over (the proxier's own effects, so nothing is recomputed for Services that did
not change), and one when Services could not be applied.  Served in ``/status`` and on
``/`` (admin/status.py); docs/status.md.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from userproxy.control.proxier import SyncStatus
from userproxy.effects import HostEffects
from userproxy.model import ListenerSpec, Protocol, ServiceKey, ServicePortName

if TYPE_CHECKING:
    from userproxy.admin.service_health import ServiceHealthServers
    from userproxy.dataplane.listener_set import ListenerSet
    from userproxy.effects import ServiceAddressSync

__all__ = ["EVENTS", "Event", "EventLog", "RecordingEffects", "port_label"]

#: Events the timeline keeps (older ones are dropped first).
EVENTS = 200

Json = dict[str, object]


def port_label(spn: ServicePortName) -> str:
    """``namespace/name:port`` (``/UDP`` appended for a non-TCP port), as the timeline says it."""
    port = f":{spn.port}" if spn.port else ""
    proto = "" if spn.protocol is Protocol.TCP else f"/{spn.protocol}"
    return f"{spn.namespace}/{spn.name}{port}{proto}"


@dataclass(frozen=True, slots=True)
class Event:
    """One timeline entry: wall-clock ``time`` (UNIX seconds), a ``kind`` ("sync",
    "endpoints", "error") and a sentence."""

    time: float
    kind: str
    message: str

    def as_json(self) -> Json:
        return {"time": round(self.time, 3), "kind": self.kind, "message": self.message}


class EventLog:
    """A ring buffer of the last ``size`` events, fed by the proxy's syncs.

    ``note_listeners`` is called for each Service a sync re-planned (before its listeners
    are applied); ``synced`` then turns what it noted into events.  Memory is bounded:
    the events by ``size``, the per-port ready counts by the ports served now (a port
    with none left is forgotten), the notes of one sync by ``size`` (a bulk load of
    10 000 Services keeps the last ones and counts the rest)."""

    def __init__(self, size: int = EVENTS, clock: Callable[[], float] = time.time) -> None:
        self.events: deque[Event] = deque(maxlen=size)
        self._clock = clock
        self._ready: dict[ServicePortName, int] = {}
        self._ports: dict[ServiceKey, set[ServicePortName]] = {}
        self._notes: deque[str] = deque(maxlen=size)
        self._noted = 0

    def add(self, kind: str, message: str) -> None:
        self.events.append(Event(self._clock(), kind, message))

    def note_listeners(self, service: ServiceKey, specs: Sequence[ListenerSpec]) -> None:
        """Compare each port's ready endpoints (over all its pools) with the last count."""
        now: dict[ServicePortName, set[tuple[str, int]]] = {}
        for spec in specs:
            ready = now.setdefault(spec.spn, set())
            for pool in (spec.pool, spec.node_pool):
                if pool is not None:
                    ready.update(e.address for e in pool.endpoints if e.ready)
        for spn in self._ports.pop(service, set()) - now.keys():
            before = self._ready.pop(spn, 0)
            if before:
                self._note(f"{port_label(spn)} {before} -> 0 ready endpoints (port removed)")
        for spn, addresses in now.items():
            before = self._ready.get(spn, 0)
            if len(addresses) != before:
                self._note(f"{port_label(spn)} {before} -> {len(addresses)} ready endpoints")
            if addresses:
                self._ready[spn] = len(addresses)
            else:
                self._ready.pop(spn, None)
        if now:
            self._ports[service] = set(now)

    def _note(self, message: str) -> None:
        self._noted += 1
        self._notes.append(message)

    def synced(self, status: SyncStatus) -> None:
        """One sync ended: its summary, then what it changed, then what failed."""
        if status.services_changed or status.slices_changed or self._noted:
            self.add(
                "sync",
                f"sync {status.syncs}: {status.services_changed} Service and "
                f"{status.slices_changed} EndpointSlice changes, {status.services_planned} "
                f"Services planned in {status.last_duration * 1000:.1f} ms",
            )
        if self._noted > len(self._notes):
            self.add("endpoints", f"{self._noted - len(self._notes)} more port changes not shown")
        for message in self._notes:
            self.add("endpoints", message)
        self._notes.clear()
        self._noted = 0
        if status.failed_services:
            self.add("error", f"{status.failed_services} Services could not be applied")

    def as_json(self) -> list[Json]:
        return [event.as_json() for event in self.events]


class RecordingEffects(HostEffects):
    """``HostEffects`` that also tell the event log what each changed Service gets."""

    def __init__(
        self,
        events: EventLog,
        listeners: ListenerSet,
        health_checks: ServiceHealthServers,
        addresses: ServiceAddressSync | None,
        on_synced: Callable[[SyncStatus], None],
    ) -> None:
        super().__init__(listeners, health_checks, addresses, on_synced)
        self._events = events

    def set_listeners(self, service: ServiceKey, specs: Sequence[ListenerSpec]) -> None:
        self._events.note_listeners(service, specs)
        super().set_listeners(service, specs)
