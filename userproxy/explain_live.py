"""The live part of ``userproxy explain --server``: what a running proxy knows beyond its plan.

:class:`ProxyLive` implements ``explain.LiveView`` over the proxy's listener set and
balancer registry, read through their public attributes, as the status page reads them
(admin/status.py):

* ejected endpoints: the Service port's ``OutlierDetector`` (``ListenerSet.outliers``),
  with the seconds until each returns;
* the client's ClientIP pin: the ``AffinityTable`` the pool's balancer picks with (shared
  by every pool of the Service port), with the time it expires;
* the balancer's next pick, where it is deterministic: maglev for this client (a pure
  hash; the ejected are walked past as the dial ladder's ``exclude`` does), round-robin's
  next for the next connection of *any* client at this listener (its position read, not
  advanced).  Other balancers (random, least-connections, power-of-two, plug-ins) are
  said not to be deterministic.

Invariants: reading never changes what the data plane does next: no pick is made through
a stateful balancer, no pin is renewed, nothing is counted.  (``OutlierDetector.status``
returns endpoints whose ejection is over, as the dial path's next ``excluding`` would.)
"""

from __future__ import annotations

import time
from collections.abc import Callable

from userproxy.balancers.affinity import AffinityTable, ClientIPAffinity
from userproxy.balancers.base import Balancer
from userproxy.balancers.maglev import Maglev
from userproxy.balancers.registry import BalancerRegistry
from userproxy.balancers.roundrobin import RoundRobin
from userproxy.dataplane.listener_set import ListenerSet
from userproxy.explain import LiveFacts, Pin
from userproxy.model import Endpoint, ListenerSpec

__all__ = ["ProxyLive"]


class ProxyLive:
    """``LiveView`` of one running proxy (see the module docstring)."""

    def __init__(
        self,
        listeners: ListenerSet,
        registry: BalancerRegistry,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.listeners = listeners
        self.registry = registry
        self._clock = clock
        self._wall_clock = wall_clock

    def look(self, spec: ListenerSpec, node_pool: bool, client: str) -> LiveFacts:
        detector = self.listeners.outliers(spec.spn)
        status = detector.status() if detector is not None else []
        ejected = {str(e.endpoint): e.remaining for e in status}
        out = {e.endpoint.address for e in status}
        listener = self.listeners.listeners.get(spec.key)
        if listener is not None and listener.spec.spn != spec.spn:
            listener = None  # the address is held by another Service port
        pool = None
        if listener is not None:
            pool = listener.node_pool if node_pool else listener.pool
        balancer = pool.balancer if pool is not None else None
        pin = self._pin(spec, balancer, client)
        inner = balancer.inner if isinstance(balancer, ClientIPAffinity) else balancer
        pick, note = _next_pick(inner, client, out)
        if balancer is None:
            note = "the listener is not serving (no endpoints, or its address is not open)"
        return LiveFacts(ejected, pin, pick, note)

    def _pin(self, spec: ListenerSpec, balancer: Balancer | None, client: str) -> Pin | None:
        table: AffinityTable | None
        if isinstance(balancer, ClientIPAffinity):
            table = balancer.table  # the very table its picks read
        else:
            table = self.registry.context.affinity.get(spec.spn)
        if table is None or spec.pool.affinity_timeout is None:
            return None
        found = table.pins.get(client)  # read, not AffinityTable.get: that counts a lookup
        if found is None:
            return None
        address, last = found
        left = last + table.timeout - table.clock()
        if left <= 0:
            return None  # expired: the next pick replaces it
        return Pin(address, round(left, 3), round(self._wall_clock() + left, 3))


def _next_pick(
    inner: Balancer | None, client: str, out: set[tuple[str, int]]
) -> tuple[str | None, str]:
    """(the next pick, what it means) of a deterministic balancer, else (None, why not)."""
    if inner is None:
        return None, ""
    exclude = _Out(out)
    if isinstance(inner, Maglev):
        chosen = inner.pick(client, exclude)  # a pure hash: picking changes nothing
        if chosen is None:
            return None, "maglev over an empty pool"
        return str(chosen), f"maglev hashes {client} to {chosen}"
    if isinstance(inner, RoundRobin):
        chosen = inner.peek(exclude)
        if chosen is None:
            return None, "round-robin over an empty pool"
        return str(chosen), (
            f"round-robin: its next pick at this address, for whichever client comes next "
            f"(a pinned one excepted), is {chosen}"
        )
    name = type(inner).__name__
    return None, f"{name}: its pick is not deterministic (depends on chance or on load)"


class _Out:
    """The ejected endpoints as the dial ladder's ``exclude`` sees them (by address)."""

    __slots__ = ("addresses",)

    def __init__(self, addresses: set[tuple[str, int]]) -> None:
        self.addresses = addresses

    def __contains__(self, endpoint: object) -> bool:
        return isinstance(endpoint, Endpoint) and endpoint.address in self.addresses
