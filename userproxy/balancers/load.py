"""Connections per endpoint through this proxy: the active ones, which load-aware balancers
read, and the totals the status page shows.

One ``EndpointLoad`` is shared by every pool (it lives in the ``BalancerRegistry``), keyed
by the endpoint's (ip, port), so an endpoint serving a Service through several listeners
(ClusterIP, NodePort, ...) is counted once, across all of them.  The data plane calls
``start`` when it picks the endpoint for a TCP connection (a connection still dialing
counts) or opens a UDP session to it; ``end`` when that dial fails without counting
(``failed`` when it counts as a dial failure); ``finished`` when the connection or session
is gone, with the bytes it carried.

Totals (``totals``): per endpoint, the connections (UDP: sessions) that finished, their
bytes each way and the failed dials, since it joined a pool.  The pools say which
endpoints they hold (``hold`` / ``release``, a count per endpoint), and only held
endpoints keep totals: an endpoint that left every pool loses them, so memory follows the
pools, not every pod that ever existed.  Open connections' bytes are not here (the relay
counts them on the connection; the status page adds them when it reports).

Invariants: ``active`` holds only endpoints with at least one connection; ``totals`` only
endpoints in ``held`` (no unbounded growth as pods come and go); ``of`` is O(1) and
allocates nothing; a connection's end costs one more dict lookup than ``end`` and no
allocation once its endpoint has totals.
"""

from __future__ import annotations

from collections.abc import Iterable

from userproxy.model import Endpoint

Key = tuple[str, int]


class EndpointTotals:
    """What finished through one endpoint (see the module docstring)."""

    __slots__ = ("bytes_down", "bytes_up", "connections", "dial_failures")

    def __init__(self) -> None:
        self.connections = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.dial_failures = 0


class EndpointLoad:
    __slots__ = ("active", "held", "totals")

    def __init__(self) -> None:
        self.active: dict[Key, int] = {}
        #: How many pools hold each endpoint now.
        self.held: dict[Key, int] = {}
        self.totals: dict[Key, EndpointTotals] = {}

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

    def finished(self, endpoint: Endpoint, bytes_up: int, bytes_down: int) -> None:
        """``end``, and count the connection and its bytes in the endpoint's totals."""
        key = (endpoint.ip, endpoint.port)
        active = self.active
        count = active.get(key, 0) - 1
        if count > 0:
            active[key] = count
        else:
            active.pop(key, None)
        totals = self.totals.get(key)
        if totals is None:
            if key not in self.held:
                return  # it left every pool: nothing is kept for it
            totals = self.totals[key] = EndpointTotals()
        totals.connections += 1
        totals.bytes_up += bytes_up
        totals.bytes_down += bytes_down

    def failed(self, endpoint: Endpoint) -> None:
        """``end`` for a dial that failed, counted in the endpoint's totals."""
        self.end(endpoint)
        key = (endpoint.ip, endpoint.port)
        totals = self.totals.get(key)
        if totals is None:
            if key not in self.held:
                return
            totals = self.totals[key] = EndpointTotals()
        totals.dial_failures += 1

    def hold(self, endpoints: Iterable[Endpoint]) -> None:
        """A pool now holds ``endpoints`` (their totals are kept from now on)."""
        held = self.held
        for endpoint in endpoints:
            key = (endpoint.ip, endpoint.port)
            held[key] = held.get(key, 0) + 1

    def release(self, endpoints: Iterable[Endpoint]) -> None:
        """A pool no longer holds ``endpoints``; one no pool holds loses its totals."""
        held = self.held
        for endpoint in endpoints:
            key = (endpoint.ip, endpoint.port)
            count = held.get(key, 0) - 1
            if count > 0:
                held[key] = count
            else:
                held.pop(key, None)
                self.totals.pop(key, None)

    def of(self, endpoint: Endpoint) -> int:
        return self.active.get((endpoint.ip, endpoint.port), 0)
