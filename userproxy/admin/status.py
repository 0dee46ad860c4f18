"""The status model: what the running proxy serves, as plain data for ``/status`` and ``/``.

Like HAProxy's stats page, ``ipvsadm -Ln`` and Envoy's ``/clusters``: every Service the
applied state holds, its ports, each port's listeners (open, or closed and why), its pools
per traffic class and every endpoint of its EndpointSlices with its conditions, node, zone,
hints, whether it is local, ejected (dataplane/outliers.py), how many connections it has
through this proxy now and its totals (balancers/load.py).  docs/status.md is the schema.

Invariants: the model is built from what the proxier applied (``Proxier.state`` and
``Proxier.plans``) and what the listener set serves, never from the sources; building it
never blocks the loop for long: :meth:`StatusView.build` works in slices of
``STATUS_SLICE`` (``Slicer``, as the proxier's sync does) and serializes each Service as it
goes, :meth:`StatusPage.send` writes in slices too, and what is kept between requests
(admin/status_rows.py) is nothing the garbage collector has to walk, so 10 000 Services
cost many short slices, not one stall.  Services that change between two slices are shown as
they are when reached (a Service deleted meanwhile is left out).

:class:`~userproxy.admin.events.EventLog` (admin/events.py) is the timeline it includes.
"""

from __future__ import annotations

import heapq
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from userproxy import __version__
from userproxy.admin.events import EventLog
from userproxy.admin.status_rows import (
    EndpointRows,
    OpenTraffic,
    PortRows,
    endpoints_text,
    open_traffic,
)
from userproxy.model import (
    AddressKind,
    ListenerSpec,
    Protocol,
    Service,
    ServiceKey,
    ServicePort,
    ServicePortName,
)
from userproxy.slices import Slicer

if TYPE_CHECKING:
    from aiohttp.web import StreamResponse

    from userproxy.balancers.registry import BalancerRegistry
    from userproxy.control.proxier import Proxier
    from userproxy.dataplane.listener_set import AnyListener, ListenerSet

__all__ = ["Json", "StatusPage", "StatusView"]

Json = dict[str, object]


#: Keys sorted in one go when ordering the Services (see ``StatusView._keys``).
SORT_CHUNK = 1000
#: Work between two yields while building or sending (seconds).  A timer or reader that
#: comes due during a slice runs only after the next one (its callback is queued behind
#: the already-ready build step), so the loop's longest stall is about two slices.
STATUS_SLICE = 0.002


def _order(key: ServiceKey) -> tuple[str, str]:
    return (key.namespace, key.name)


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

    async def send(self, response: StreamResponse) -> None:
        """Write the answer to a prepared ``response``, yielding to the loop between
        slices: a client that keeps up never makes ``write`` wait, and then the 150 writes
        of 10 000 Services (each a send() of 90 KB) held the loop 15-20 ms in one go."""
        slicer = Slicer(every=1, seconds=STATUS_SLICE)
        for piece in self.pieces():
            await response.write(piece.encode())
            await slicer.tick()
        await response.write_eof()


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
        self._rows = EndpointRows()

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
        slicer = Slicer(every=256, seconds=STATUS_SLICE)
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
        opened = await open_traffic(self.listeners, STATUS_SLICE)
        services: list[Json] = []
        texts: list[str] = []
        slicer = Slicer(every=4, seconds=STATUS_SLICE)
        for key in chosen:
            service = self.proxier.state.services.get(key)
            if service is not None:  # else deleted since the list was taken
                text = self.service_text(service, opened, key)
                if as_text:
                    texts.append(text)
                else:  # a page of objects for the HTML page (100 Services: about 1 ms)
                    services.append(json.loads(text))
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
            slicer = Slicer(every=1, seconds=STATUS_SLICE)
            runs = []
            for start in range(0, len(everything), SORT_CHUNK):
                runs.append(sorted(everything[start : start + SORT_CHUNK], key=_order))
                await slicer.tick()
            merged = []
            slicer = Slicer(every=256, seconds=STATUS_SLICE)
            for key in heapq.merge(*runs, key=_order):
                merged.append(key)
                await slicer.tick()
            if self.proxier.status.syncs == syncs:  # else a sync ended meanwhile: redo next time
                self._sorted, self._sorted_at = merged, syncs
            return merged
        return self._sorted

    def service_text(
        self, service: Service, opened: OpenTraffic, key: ServiceKey | None = None
    ) -> str:
        """One Service as JSON, as the schema in docs/status.md says (``opened``: what is
        open per endpoint now, from ``open_traffic``; ``key``: its key, the applied
        state's).  The endpoint lists come as text (``endpoints_text``) and are spliced
        in: "ports" and "endpoints" are the last fields of their objects."""
        key = service.key if key is None else key
        proxier = self.proxier
        plan = proxier.plans.get(key)
        specs = plan.listeners if plan is not None else ()
        rows = self._rows.of(
            service, plan, tuple(proxier.state.slices_of(key)),
            node_name=proxier.node_name, services=proxier.state.services, key=key,
        )  # fmt: skip
        balancer = specs[0].pool.balancer if specs else self.registry.resolve(service.balancer)
        head = {
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
            "error": proxier.failed.get(key),
        }
        ports = [
            self._port(port, spn, [s for s in specs if s.spn == spn], port_rows, opened)
            for port, spn, port_rows in zip(
                service.ports, map(service.port_name, service.ports), rows, strict=True
            )
        ]
        return json.dumps(head)[:-1] + ', "ports": [' + ", ".join(ports) + "]}"

    def _port(
        self,
        port: ServicePort,
        spn: ServicePortName,
        specs: list[ListenerSpec],
        rows: PortRows,
        opened: OpenTraffic,
    ) -> str:
        detector = self.listeners.outliers(spn)
        ejected = {e.address for e in detector.ejected} if detector is not None else set()
        load = self.registry.context.load
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
        found = rows[0]
        fields = {
            "name": spn.port,
            "protocol": str(spn.protocol),
            "port": port.port,
            "node_port": port.node_port,
            "counts": {
                "endpoints": len(found),
                "ready": sum(1 for r in found if r[1]),
                "serving": sum(1 for r in found if r[2]),
                "terminating": sum(1 for r in found if r[3]),
                "not_ready": sum(1 for r in found if not r[1]),
                "ejected": sum(1 for r in found if r[0] in ejected) if ejected else 0,
            },
            "listeners": listeners,
            "pools": pools,
            "totals": totals,
        }
        endpoints = endpoints_text(rows, ejected, load, opened)
        return json.dumps(fields)[:-1] + ', "endpoints": ' + endpoints + "}"


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
