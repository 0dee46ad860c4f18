"""The endpoint rows of the status model: what of them the Service, its plan and its slices
decide (kept between requests), and what the data plane adds at each request.

Building a Service's endpoints (``build_endpoints`` over its slices) is the costliest part
of its status and the same from one request to the next while the sources hand over the
same objects, so ``EndpointRows`` keeps it per Service.  The kept form matters as much as
keeping it: the first cache held each Service's ``Endpoint`` objects, dicts and tuples
(some 14 collector-tracked objects per Service, 130 000 with 10 000 Services), and filling
it set off a full collection of them (50 ms on the loop) that later collections walked
again.  So a row is a tuple of str, int and bool only, and the collector untracks such
tuples the first time it meets them: what stays tracked is one tuple per Service (its
rows and the objects they were built from, for the identity check).

The fields that do not change between requests are kept as JSON text (``head``), and a
port whose endpoints have no traffic and none ejected as its whole endpoint list's text
(``PortRows.idle``), so the common case costs no serializing at all: encoding these rows
anew was a third of answering ``/status`` for 10 000 Services.

Invariants: a kept entry is used only while its Service, plan and slices are the very
objects it was built from (the sources replace them on change); entries of deleted
Services are dropped by a sweep once they could be half the cache.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

from userproxy.control.endpoints import build_endpoints, service_families
from userproxy.model import EndpointSlice, Service, ServiceKey, SliceEndpoint
from userproxy.slices import Slicer

if TYPE_CHECKING:
    from userproxy.balancers.load import EndpointLoad
    from userproxy.control.plan import ServicePlan
    from userproxy.dataplane.listener_set import ListenerSet

__all__ = ["EndpointRows", "OpenTraffic", "PortRows", "Row", "endpoints_text", "open_traffic"]

#: One endpoint: its (ip, port), ready, serving, terminating, and ``head``: the JSON text
#: of the schema's ENDPOINT up to "local" included, open for the fields counted now
#: (docs/status.md).
Row = tuple[tuple[str, int], bool, bool, bool, str]
#: A port's rows, and the JSON text of its endpoint list when nothing counts for them.
PortRows = tuple[tuple[Row, ...], str]
#: Per endpoint (ip, port): [connections, bytes up, bytes down] open now.
OpenTraffic = dict[tuple[str, int], list[int]]

#: The counted fields of an endpoint with no traffic that is not ejected.
IDLE_TAIL = (
    '"ejected": false, "active_connections": 0, "connections_total": 0, "bytes_up": 0, '
    '"bytes_down": 0, "dial_failures": 0}'
)


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
    ) -> tuple[PortRows, ...]:
        """The rows of ``service`` per port (``services``: every Service there is now; ``key``: its
        key, best the applied state's own object: a new one per call would be kept)."""
        kept = self._kept.get(key)
        if (
            kept is not None
            and len(kept) == len(slices) + 3
            and kept[1] is service
            and kept[2] is plan
            and all(a is b for a, b in zip(kept[3:], slices, strict=True))
        ):
            return cast("tuple[PortRows, ...]", kept[0])
        rows = _rows(service, plan, slices, node_name)
        self._kept[key] = (rows, service, plan, *slices)
        if len(self._kept) > 2 * len(services) + 64:
            # Forget deleted Services (a sweep now and then: the cache stays O(Services)).
            self._kept = {k: v for k, v in self._kept.items() if k in services}
        return rows


def _rows(
    service: Service, plan: ServicePlan | None, slices: tuple[EndpointSlice, ...], node: str
) -> tuple[PortRows, ...]:
    if plan is None or not plan.listeners:  # not served: no endpoints are shown
        return tuple(((), "[]") for _ in service.ports)
    by_address: dict[str, SliceEndpoint] = {}
    for eps in slices:
        for slice_ep in eps.endpoints:
            by_address.setdefault(slice_ep.address, slice_ep)
    endpoints = build_endpoints(service, slices, node)
    families = service_families(service)
    ports: list[PortRows] = []
    for port in service.ports:
        spn = service.port_name(port)
        rows: list[Row] = []
        for family in families:
            for e in endpoints.get((spn, family), ()):
                found = by_address.get(e.ip)
                # A template, not json.dumps of a dict: a third of the cost, and this runs
                # for every endpoint the first time.  The address is an IP and a number
                # (checked at the source boundary); names are encoded.
                head = (
                    f'{{"address": "{e}", "ready": {_BOOL[e.ready]}, '
                    f'"serving": {_BOOL[e.serving]}, "terminating": {_BOOL[e.terminating]}, '
                    f'"node": {_text(found.node_name if found is not None else None)}, '
                    f'"zone": {_text(found.zone if found is not None else None)}, '
                    f'"zone_hints": {_texts(e.zone_hints)}, "node_hints": {_texts(e.node_hints)}, '
                    f'"local": {_BOOL[e.is_local]}, '
                )
                rows.append(((e.ip, e.port), e.ready, e.serving, e.terminating, head))
        idle = "[" + ", ".join(row[4] + IDLE_TAIL for row in rows) + "]"
        ports.append((tuple(rows), idle))
    return tuple(ports)


_BOOL = {True: "true", False: "false"}


def _text(value: str | None) -> str:
    return "null" if value is None else json.dumps(value)


def _texts(values: frozenset[str]) -> str:
    return json.dumps(sorted(values)) if values else "[]"


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


def endpoints_text(
    rows: PortRows, ejected: set[tuple[str, int]], load: EndpointLoad, opened: OpenTraffic
) -> str:
    """The JSON text of a port's endpoint list: each row with what the data plane counts
    for it now (its totals, plus the connections open now: ``opened``)."""
    found, idle = rows
    active, totals = load.active, load.totals
    if not ejected and not any(
        r[0] in totals or r[0] in active or r[0] in opened for r in found
    ):  # nothing to count: the kept text
        return idle
    texts = []
    for key, _, _, _, head in found:
        record = totals.get(key)
        now = opened.get(key)
        connections = up = down = failures = 0
        if record is not None:
            connections, up, down = record.connections, record.bytes_up, record.bytes_down
            failures = record.dial_failures
        if now is not None:
            connections += now[0]
            up += now[1]
            down += now[2]
        texts.append(
            f'{head}"ejected": {"true" if key in ejected else "false"}, '
            f'"active_connections": {active.get(key, 0)}, "connections_total": {connections}, '
            f'"bytes_up": {up}, "bytes_down": {down}, "dial_failures": {failures}}}'
        )
    return "[" + ", ".join(texts) + "]"
