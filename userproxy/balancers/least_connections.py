"""Least connections: the endpoint with the fewest active connections through this proxy.

Models HAProxy's ``balance leastconn`` and IPVS's ``lc`` scheduler: the load is what this
proxy itself has open to each endpoint (``EndpointLoad``, shared by every pool, so an
endpoint reached through a ClusterIP and a NodePort listener is counted once), not what the
endpoint serves for other clients.  Like HAProxy, endpoints with equal load are taken in
turn: the scan starts one past the last endpoint chosen, so ties rotate instead of always
favouring the first endpoint of the pool (which would pile every burst of new connections
onto one pod while the others sit at the same count).

Cost: a pick reads the load of every endpoint (O(N), no allocation) but stops at the first
idle one, which is the common case below saturation.  For pools of hundreds of endpoints
``power-of-two`` gives nearly the same balance at O(1) (Envoy's reason for making it the
default of ``least_request``).

Invariants: ``pick`` returns an endpoint of the pool (None only for an empty pool); an
endpoint in ``exclude`` is returned only when every endpoint is excluded, and then the
least loaded of all of them (a retry ladder goes round again).
"""

from __future__ import annotations

import random
from collections.abc import Container, Sequence

from userproxy.balancers.base import Balancer
from userproxy.balancers.load import EndpointLoad
from userproxy.model import Endpoint


class LeastConnections:
    __slots__ = ("_endpoints", "_keys", "_load", "_next")

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        load: EndpointLoad,
        rng: random.Random | None = None,
    ) -> None:
        # Shuffled once per pool change, as round-robin does, so many proxies starting on
        # the same idle pool do not all send their first connection to the same endpoint.
        shuffled = list(endpoints)
        (rng or random).shuffle(shuffled)
        self._endpoints: tuple[Endpoint, ...] = tuple(shuffled)
        # The load table's keys, computed once here so a pick builds no tuple.
        self._keys: tuple[tuple[str, int], ...] = tuple((e.ip, e.port) for e in shuffled)
        self._load = load
        self._next = 0

    @property
    def endpoints(self) -> Sequence[Endpoint]:
        return self._endpoints

    def pick(self, client_ip: str, exclude: Container[Endpoint] = ()) -> Endpoint | None:
        endpoints = self._endpoints
        count = len(endpoints)
        if count == 0:
            return None
        active = self._load.active
        keys = self._keys
        start = self._next % count
        best = -1
        best_load = 0
        fallback = -1
        fallback_load = 0
        for offset in range(count):
            index = start + offset
            if index >= count:
                index -= count
            load = active.get(keys[index], 0)
            if endpoints[index] in exclude:
                if fallback < 0 or load < fallback_load:
                    fallback, fallback_load = index, load
                continue
            if best < 0 or load < best_load:
                best, best_load = index, load
                if load == 0:
                    break  # nothing beats an idle endpoint
        chosen = best if best >= 0 else fallback
        self._next = chosen + 1
        return endpoints[chosen]

    def failed(self, client_ip: str, endpoint: Endpoint) -> None:
        """Least connections keeps no per-client state; a failed dial never counted."""

    def renew(self, endpoints: Sequence[Endpoint]) -> Balancer:
        return LeastConnections(endpoints, self._load)
