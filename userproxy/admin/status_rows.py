"""The endpoint rows of the status model: what of them the Service, its plan and its slices
decide (kept between requests), and what the data plane adds at each request.

Building a Service's endpoints (``build_endpoints`` over its slices) is the costliest part
of its status and the same from one request to the next while the sources hand over the
same objects, so ``EndpointRows`` keeps it per Service.  The kept form matters as much as
keeping it: the first cache held each Service's ``Endpoint`` objects, dicts and tuples
(some 14 collector-tracked objects per Service, 130 000 with 10 000 Services), and filling
it set off a full collection of them (50 ms on the loop) that later collections walked
again.  So a row is a tuple of str, int, bool and None only, and the collector untracks
such tuples the first time it meets them: what stays tracked is one tuple per Service
(its rows and the objects they were built from, for the identity check).

Invariants: a kept entry is used only while its Service, plan and slices are the very
objects it was built from (the sources replace them on change); entries of deleted
Services are dropped by a sweep once they could be half the cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

from userproxy.control.endpoints import build_endpoints, service_families
from userproxy.model import EndpointSlice, Service, ServiceKey, SliceEndpoint
from userproxy.slices import Slicer

if TYPE_CHECKING:
    from userproxy.balancers.load import EndpointLoad
    from userproxy.control.plan import ServicePlan
    from userproxy.dataplane.listener_set import ListenerSet

__all__ = ["EndpointRows", "OpenTraffic", "Row", "endpoint_json", "open_traffic"]

#: One endpoint: ip, port, then the schema's address, ready, serving, terminating, node,
#: zone, zone_hints, node_hints and local (docs/status.md, ENDPOINT).
Row = tuple[
    str, int, str, bool, bool, bool, str | None, str | None, tuple[str, ...], tuple[str, ...], bool
]
#: Per endpoint (ip, port): [connections, bytes up, bytes down] open now.
OpenTraffic = dict[tuple[str, int], list[int]]


class EndpointRows:
    """Each Service's endpoint rows per port (in the Service's port order), kept."""

    def __init__(self) -> None:
        #: (rows, service, plan, *slices) per Service: one tracked tuple each.
        self._kept: dict[ServiceKey, tuple[object, ...]] = {}

    def of(
        self,
        service: Service,
        plan: ServicePlan | None,
        slices: tuple[EndpointSlice, ...],
        *,
        node_name: str,
        services: Mapping[ServiceKey, Service],
        key: ServiceKey,
    ) -> tuple[tuple[Row, ...], ...]:
        """The rows of ``service`` (``services``: every Service there is now; ``key``: its
        key, best the applied state's own object: a new one per call would be kept)."""
        kept = self._kept.get(key)
        if (
            kept is not None
            and len(kept) == len(slices) + 3
            and kept[1] is service
            and kept[2] is plan
            and all(a is b for a, b in zip(kept[3:], slices, strict=True))
        ):
            return cast("tuple[tuple[Row, ...], ...]", kept[0])
        rows = _rows(service, plan, slices, node_name)
        self._kept[key] = (rows, service, plan, *slices)
        if len(self._kept) > 2 * len(services) + 64:
            # Forget deleted Services (a sweep now and then: the cache stays O(Services)).
            self._kept = {k: v for k, v in self._kept.items() if k in services}
        return rows


def _rows(
    service: Service, plan: ServicePlan | None, slices: tuple[EndpointSlice, ...], node: str
) -> tuple[tuple[Row, ...], ...]:
    by_address: dict[str, SliceEndpoint] = {}
    for eps in slices:
        for slice_ep in eps.endpoints:
            by_address.setdefault(slice_ep.address, slice_ep)
    if plan is None or not plan.listeners:  # not served: no endpoints are shown
        return tuple(() for _ in service.ports)
    endpoints = build_endpoints(service, slices, node)
    families = service_families(service)
    ports = []
    for port in service.ports:
        spn = service.port_name(port)
        rows = []
        for family in families:
            for e in endpoints.get((spn, family), ()):
                found = by_address.get(e.ip)
                rows.append(
                    (e.ip, e.port, str(e), e.ready, e.serving, e.terminating,
                     found.node_name if found is not None else None,
                     found.zone if found is not None else None,
                     tuple(sorted(e.zone_hints)), tuple(sorted(e.node_hints)), e.is_local)
                )  # fmt: skip
        ports.append(tuple(rows))
    return tuple(ports)


async def open_traffic(listeners: ListenerSet, slice_seconds: float) -> OpenTraffic:
    """What is open now per endpoint: TCP connections joined to it and UDP sessions, with
    their bytes so far, over the listeners serving now (a removed port's connections,
    still draining, count in the totals once they end).  Nothing is open when the load
    counts no endpoint; else one pass over every listener (1-2 ms for 10 000), in slices
    of ``slice_seconds``."""
    from userproxy.dataplane.tcp_listener import TcpListener

    result: OpenTraffic = {}
    if not listeners.registry.context.load.active:  # every connection and session counts
        return result
    slicer = Slicer(every=1, seconds=slice_seconds)
    everything = list(listeners)
    for start in range(0, len(everything), 512):
        # Nothing in this loop awaits: the sets and dicts walked cannot change under it.
        for listener in everything[start : start + 512]:
            if isinstance(listener, TcpListener):
                for conn in listener.connections:
                    endpoint = conn.endpoint
                    if endpoint is not None:  # joined (not dialing)
                        _add(result, (endpoint.ip, endpoint.port), conn.bytes_up, conn.bytes_down)
            else:
                for session in listener.sessions.values():
                    endpoint = session.endpoint
                    _add(result, (endpoint.ip, endpoint.port), session.bytes_up,
                         session.bytes_down)  # fmt: skip
        await slicer.tick()
    return result


def _add(result: OpenTraffic, key: tuple[str, int], up: int, down: int) -> None:
    counts = result.get(key)
    if counts is None:
        result[key] = [1, up, down]
    else:
        counts[0] += 1
        counts[1] += up
        counts[2] += down


def endpoint_json(
    row: Row, ejected: bool, load: EndpointLoad, opened: OpenTraffic
) -> dict[str, object]:
    """The schema's ENDPOINT: ``row`` and what the data plane counts for it now."""
    key = (row[0], row[1])
    totals = load.totals.get(key)
    now = opened.get(key)
    connections = up = down = failures = 0
    if totals is not None:
        connections, up, down = totals.connections, totals.bytes_up, totals.bytes_down
        failures = totals.dial_failures
    if now is not None:
        connections += now[0]
        up += now[1]
        down += now[2]
    return {
        "address": row[2],
        "ready": row[3],
        "serving": row[4],
        "terminating": row[5],
        "node": row[6],
        "zone": row[7],
        "zone_hints": list(row[8]),
        "node_hints": list(row[9]),
        "local": row[10],
        "ejected": ejected,
        "active_connections": load.active.get(key, 0),
        "connections_total": connections,
        "bytes_up": up,
        "bytes_down": down,
        "dial_failures": failures,
    }
