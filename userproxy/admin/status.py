"""The status model: what the running proxy serves, as plain data for ``/status`` and ``/``.

Like HAProxy's stats page, ``ipvsadm -Ln`` and Envoy's ``/clusters``: every Service the
applied state holds, its ports, each port's listeners (open, or closed and why), its pools
per traffic class and every endpoint of its EndpointSlices with its conditions, node, zone,
hints, whether it is local, ejected (dataplane/outliers.py) and how many connections it has
through this proxy now (balancers/load.py).  docs/status.md is the schema.

Invariants: the model is built from what the proxier applied (``Proxier.state`` and
``Proxier.plans``) and what the listener set serves, never from the sources; building it
never blocks the loop for long: :meth:`StatusView.build` works in slices (``Slicer``, as
the proxier's sync does) and serializes each Service as it goes, so 10 000 Services cost
many short slices, not one stall.  Services that change between two slices are shown as
they are when reached (a Service deleted meanwhile is left out).

:class:`EventLog` is the bounded timeline (the last ``EVENTS`` events): one entry per sync
that changed something, one per Service port whose ready-endpoint count changed (noted by
:class:`RecordingEffects` as the proxier hands each changed Service's listeners over).
"""

from __future__ import annotations

import heapq
import json
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from userproxy import __version__
from userproxy.control.endpoints import build_endpoints, service_families
from userproxy.control.proxier import SyncStatus
from userproxy.effects import HostEffects
from userproxy.model import (
    AddressKind,
    Endpoint,
    ListenerSpec,
    Protocol,
    Service,
    ServiceKey,
    ServicePort,
    ServicePortName,
    SliceEndpoint,
)
from userproxy.slices import Slicer

if TYPE_CHECKING:
    from userproxy.admin.service_health import ServiceHealthServers
    from userproxy.balancers.registry import BalancerRegistry
    from userproxy.control.proxier import Proxier
    from userproxy.dataplane.listener_set import AnyListener, ListenerSet
    from userproxy.effects import ServiceAddressSync

__all__ = [
    "EVENTS",
    "Event",
    "EventLog",
    "RecordingEffects",
    "StatusPage",
    "StatusView",
    "port_label",
]

#: Events the timeline keeps (older ones are dropped first).
EVENTS = 200

Json = dict[str, object]


#: Keys sorted in one go when ordering the Services (see ``StatusView._keys``).
SORT_CHUNK = 1000


def _order(key: ServiceKey) -> tuple[str, str]:
    return (key.namespace, key.name)


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


@dataclass(frozen=True, slots=True)
class StatusPage:
    """One answer: the header fields and the Services of the page, as objects
    (``services``, for the HTML page) or already serialized (``texts``, for ``/status``)."""

    header: Json
    services: list[Json]
    texts: list[str]

    def pieces(self, group: int = 64) -> Iterator[str]:
        """The answer as JSON in pieces of ``group`` Services (a server writes them one by
        one: joining and encoding 14 MB at once would hold the loop for tens of ms)."""
        parts = self.texts or [json.dumps(service) for service in self.services]
        yield json.dumps(self.header)[:-1] + ', "services": ['
        for start in range(0, len(parts), group):
            yield (", " if start else "") + ", ".join(parts[start : start + group])
        yield "]}"

    def to_json(self) -> str:
        return "".join(self.pieces())


class StatusView:
    """Builds the status model of one proxy (see the module docstring)."""

    def __init__(
        self,
        proxier: Proxier,
        listeners: ListenerSet,
        registry: BalancerRegistry,
        events: EventLog,
        node: str,
    ) -> None:
        self.proxier = proxier
        self.listeners = listeners
        self.registry = registry
        self.events = events
        self.node = node
        #: The Service keys in order, and the sync they are of (sorted once per sync).
        self._sorted: list[ServiceKey] = []
        self._sorted_at = -1

    async def build(
        self, query: str = "", page: int = 1, page_size: int = 0, *, as_text: bool = False
    ) -> StatusPage:
        """The Services whose ``namespace/name`` contains ``query`` (any case), sorted,
        page ``page`` (from 1) of ``page_size`` (0: all), built in slices.

        ``as_text``: serialize each Service as it is built and keep only the string.  With
        10 000 Services, keeping the objects grows the heap by hundreds of thousands of
        dicts and sets off full collections of 100-800 ms (see userproxy/slices.py); strings
        are not tracked by the collector."""
        keys = await self._keys()
        slicer = Slicer(every=256)
        needle = query.strip().lower()
        if needle:
            matched = []
            for key in keys:
                if needle in f"{key.namespace}/{key.name}".lower():
                    matched.append(key)
                await slicer.tick()
            keys = matched
        total = len(keys)
        size = page_size if page_size > 0 else max(total, 1)
        pages = max(1, -(-total // size))
        page = min(max(page, 1), pages)
        chosen = keys[(page - 1) * size : page * size]
        services: list[Json] = []
        texts: list[str] = []
        slicer = Slicer(every=4)
        for key in chosen:
            service = self.proxier.state.services.get(key)
            if service is not None:  # else deleted since the list was taken
                if as_text:
                    texts.append(json.dumps(self.service(service)))
                else:
                    services.append(self.service(service))
            await slicer.tick()
        status = self.proxier.status
        header: Json = {
            "version": __version__,
            "node": self.node,
            "generated_at": round(time.time(), 3),
            "sync": {
                "syncs": status.syncs,
                "last_duration_seconds": round(status.last_duration, 6),
                "failed_services": status.failed_services,
            },
            "services_total": len(self.proxier.state.services),
            "services_matched": total,
            "query": query,
            "page": page,
            "pages": pages,
            "page_size": page_size,
            "events": self.events.as_json(),
        }
        return StatusPage(header, services, texts)

    async def _keys(self) -> list[ServiceKey]:
        """Every Service key, by namespace and name: sorted once per sync (the applied
        state changes only in syncs), in chunks of ``SORT_CHUNK`` merged in slices, as one
        sort of 10 000 keys would hold the loop for 10-20 ms."""
        syncs = self.proxier.status.syncs
        if syncs != self._sorted_at:
            everything = list(self.proxier.state.services)
            slicer = Slicer(every=1)
            runs = []
            for start in range(0, len(everything), SORT_CHUNK):
                runs.append(sorted(everything[start : start + SORT_CHUNK], key=_order))
                await slicer.tick()
            merged = []
            slicer = Slicer(every=256)
            for key in heapq.merge(*runs, key=_order):
                merged.append(key)
                await slicer.tick()
            if self.proxier.status.syncs == syncs:  # else a sync ended meanwhile: redo next time
                self._sorted, self._sorted_at = merged, syncs
            return merged
        return self._sorted

    def service(self, service: Service) -> Json:
        """One Service as the schema in docs/status.md says."""
        key = service.key
        plan = self.proxier.plans.get(key)
        specs = plan.listeners if plan is not None else ()
        slices = list(self.proxier.state.slices_of(key))
        by_address: dict[str, SliceEndpoint] = {}
        for eps in slices:
            for slice_ep in eps.endpoints:
                by_address.setdefault(slice_ep.address, slice_ep)
        endpoints = build_endpoints(service, slices, self.proxier.node_name) if specs else {}
        families = service_families(service)
        spns = [service.port_name(port) for port in service.ports]
        balancer = specs[0].pool.balancer if specs else self.registry.resolve(service.balancer)
        return {
            "namespace": service.namespace,
            "name": service.name,
            "type": str(service.type),
            "cluster_ips": list(service.cluster_ips),
            "internal_traffic_policy": str(service.internal_traffic_policy),
            "external_traffic_policy": str(service.external_traffic_policy),
            "balancer": balancer,
            "affinity": None
            if service.affinity_timeout is None
            else {"type": "ClientIP", "timeout_seconds": service.affinity_timeout},
            "error": self.proxier.failed.get(key),
            "ports": [
                self._port(
                    port,
                    spn,
                    [s for s in specs if s.spn == spn],
                    [e for f in families for e in endpoints.get((spn, f), ())],
                    by_address,
                )
                for port, spn in zip(service.ports, spns, strict=True)
            ],
        }

    def _port(
        self,
        port: ServicePort,
        spn: ServicePortName,
        specs: list[ListenerSpec],
        endpoints: list[Endpoint],
        by_address: dict[str, SliceEndpoint],
    ) -> Json:
        detector = self.listeners.outliers(spn)
        ejected = {e.address for e in detector.ejected} if detector is not None else set()
        load = self.registry.context.load
        rows = [
            _endpoint(e, by_address.get(e.ip), e.address in ejected, load.of(e)) for e in endpoints
        ]
        listeners: list[Json] = []
        pools: dict[str, list[str]] = {}
        totals = {"active": 0, "accepted": 0, "dial_failures": 0, "bytes_up": 0, "bytes_down": 0}
        for spec in specs:
            listener = self.listeners.listeners.get(spec.key)
            if listener is not None and listener.spec.spn != spec.spn:
                listener_json = _listener(spec, None, f"address held by {listener.spec.spn}")
            else:
                listener_json = _listener(spec, listener, None)
                if listener is not None:
                    _add_totals(totals, listener)
            listeners.append(listener_json)
            if spec.kind is AddressKind.CLUSTER_IP:
                pools.setdefault("internal", [str(e) for e in spec.pool.endpoints])
            else:
                pools.setdefault("external", [str(e) for e in spec.pool.endpoints])
                if spec.node_pool is not None:
                    pools.setdefault("cluster", [str(e) for e in spec.node_pool.endpoints])
        return {
            "name": spn.port,
            "protocol": str(spn.protocol),
            "port": port.port,
            "node_port": port.node_port,
            "counts": {
                "endpoints": len(rows),
                "ready": sum(1 for e in endpoints if e.ready),
                "serving": sum(1 for e in endpoints if e.serving),
                "terminating": sum(1 for e in endpoints if e.terminating),
                "not_ready": sum(1 for e in endpoints if not e.ready),
                "ejected": sum(1 for e in endpoints if e.address in ejected),
            },
            "listeners": listeners,
            "pools": pools,
            "totals": totals,
            "endpoints": rows,
        }


def _endpoint(endpoint: Endpoint, found: SliceEndpoint | None, ejected: bool, active: int) -> Json:
    return {
        "address": str(endpoint),
        "ready": endpoint.ready,
        "serving": endpoint.serving,
        "terminating": endpoint.terminating,
        "node": found.node_name if found is not None else None,
        "zone": found.zone if found is not None else None,
        "zone_hints": sorted(endpoint.zone_hints),
        "node_hints": sorted(endpoint.node_hints),
        "local": endpoint.is_local,
        "ejected": ejected,
        "active_connections": active,
    }


def _listener(spec: ListenerSpec, listener: AnyListener | None, held: str | None) -> Json:
    """A listener wanted by the plan: open, or closed with the reason."""
    reason: str | None
    if held is not None:
        reason, is_open = held, False
    elif spec.spn.protocol is Protocol.SCTP:
        reason, is_open = "SCTP is not proxied", False
    elif listener is None or listener.closed:
        reason, is_open = "not served", False
    elif listener.listening:
        is_open = True
        reason = (
            "open to source ranges " + ", ".join(spec.source_ranges) if spec.source_ranges else None
        )
    elif listener.bind_error is not None:
        error = listener.bind_error
        reason, is_open = f"bind error: {error.strerror or error}", False
    elif not spec.serves_anyone:
        reason, is_open = "no endpoints", False
    else:
        reason, is_open = "not listening", False
    address = f"[{spec.ip}]:{spec.port}" if ":" in spec.ip else f"{spec.ip}:{spec.port}"
    return {
        "address": address,
        "kind": str(spec.kind),
        "protocol": str(spec.spn.protocol),
        "open": is_open,
        "reason": reason,
        "source_ranges": list(spec.source_ranges),
        "proxy_protocol": spec.proxy_protocol,
    }


def _add_totals(totals: dict[str, int], listener: AnyListener) -> None:
    """Add the listener's counters (and its open connections' bytes) to ``totals``."""
    from userproxy.dataplane.tcp_listener import TcpListener

    stats = listener.stats
    totals["dial_failures"] += stats.dial_failures
    totals["bytes_up"] += stats.bytes_up
    totals["bytes_down"] += stats.bytes_down
    if isinstance(listener, TcpListener):
        totals["accepted"] += stats.accepted
        totals["active"] += len(listener.connections)
        for conn in listener.connections:
            totals["bytes_up"] += conn.bytes_up
            totals["bytes_down"] += conn.bytes_down
    else:
        totals["accepted"] += stats.sessions_created
        totals["active"] += len(listener.sessions)
