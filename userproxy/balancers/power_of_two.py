"""Power of two choices: two distinct endpoints at random, the less loaded one wins.

Models Envoy's ``LEAST_REQUEST`` policy with its default ``choice_count: 2`` and HAProxy's
``balance random(2)`` (Mitzenmacher, "The Power of Two Choices in Randomized Load
Balancing", 2001): with n connections over N endpoints the busiest endpoint holds
O(log log N) more than the mean, against O(log N / log log N) for one random choice, at an
O(1) cost per pick whatever the pool size.  The load is ``EndpointLoad``: the connections
this proxy has open to each endpoint.  On equal load the first draw wins (both are random).

Invariants: ``pick`` returns an endpoint of the pool (None only for an empty pool); an
endpoint in ``exclude`` is returned only when every endpoint is excluded.  Only a pick
with a non-empty ``exclude`` (a dial retry) may build a candidate list; the first pick of
a connection allocates nothing.
"""

from __future__ import annotations

import random
from collections.abc import Container, Sequence

from userproxy.balancers.base import Balancer
from userproxy.balancers.load import EndpointLoad
from userproxy.model import Endpoint


class PowerOfTwo:
    __slots__ = ("_endpoints", "_load", "_random", "_rng")

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        load: EndpointLoad,
        rng: random.Random | None = None,
    ) -> None:
        self._endpoints: tuple[Endpoint, ...] = tuple(endpoints)
        self._load = load
        self._rng = rng or random.Random()
        self._random = self._rng.random

    @property
    def endpoints(self) -> Sequence[Endpoint]:
        return self._endpoints

    def pick(self, client_ip: str, exclude: Container[Endpoint] = ()) -> Endpoint | None:
        endpoints = self._endpoints
        first, second = self._draw(endpoints)
        if first is None:
            return None
        if first in exclude or second in exclude:
            # A retry after a failed dial: choose among the endpoints not tried yet.
            rest = tuple(e for e in endpoints if e not in exclude)
            if rest:
                first, second = self._draw(rest)
        if first is None or second is None:
            return first
        active = self._load.active
        if active.get((second.ip, second.port), 0) < active.get((first.ip, first.port), 0):
            return second
        return first

    def _draw(self, endpoints: tuple[Endpoint, ...]) -> tuple[Endpoint | None, Endpoint | None]:
        """Two distinct endpoints uniformly at random (one, twice, for a pool of one)."""
        count = len(endpoints)
        if count <= 1:
            only = endpoints[0] if count else None
            return only, only
        rand = self._random
        i = int(rand() * count)
        # Draw the second from the other count - 1 and step over the first: distinct
        # without a retry loop.
        j = int(rand() * (count - 1))
        if j >= i:
            j += 1
        return endpoints[i], endpoints[j]

    def failed(self, client_ip: str, endpoint: Endpoint) -> None:
        """Power of two keeps no per-client state."""

    def renew(self, endpoints: Sequence[Endpoint]) -> Balancer:
        return PowerOfTwo(endpoints, self._load, self._rng)
