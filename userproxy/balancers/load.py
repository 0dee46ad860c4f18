"""Active connections per endpoint through this proxy: what load-aware balancers read.

One ``EndpointLoad`` is shared by every pool (it lives in the ``BalancerRegistry``), keyed
by the endpoint's (ip, port), so an endpoint serving a Service through several listeners
(ClusterIP, NodePort, ...) is counted once, across all of them.  The data plane calls
``start`` when it picks the endpoint for a TCP connection (a connection still dialing
counts) or opens a UDP session to it, and ``end`` when that dial fails or the connection or
session is gone.

Invariant: ``active`` holds only endpoints with at least one connection (no unbounded
growth as pods come and go); ``of`` is O(1) and allocates nothing.
"""

from __future__ import annotations

from userproxy.model import Endpoint


class EndpointLoad:
    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active: dict[tuple[str, int], int] = {}

    def start(self, endpoint: Endpoint) -> None:
        key = (endpoint.ip, endpoint.port)
        self.active[key] = self.active.get(key, 0) + 1

    def end(self, endpoint: Endpoint) -> None:
        key = (endpoint.ip, endpoint.port)
        count = self.active.get(key, 0) - 1
        if count > 0:
            self.active[key] = count
        else:
            self.active.pop(key, None)

    def of(self, endpoint: Endpoint) -> int:
        return self.active.get((endpoint.ip, endpoint.port), 0)
