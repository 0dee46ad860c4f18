"""Round-robin over a pool shuffled once per change (kube-proxy's userspace default).

Shuffling when the pool changes spreads the first connections of many proxies over
different endpoints instead of all starting at the first one.
"""

from __future__ import annotations

import random
from collections.abc import Container, Sequence

from userproxy.balancers.base import Balancer
from userproxy.model import Endpoint


class RoundRobin:
    __slots__ = ("_endpoints", "_next")

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random | None = None) -> None:
        shuffled = list(endpoints)
        (rng or random).shuffle(shuffled)
        self._endpoints: tuple[Endpoint, ...] = tuple(shuffled)
        self._next = 0

    @property
    def endpoints(self) -> Sequence[Endpoint]:
        return self._endpoints

    def pick(self, client_ip: str, exclude: Container[Endpoint] = ()) -> Endpoint | None:
        endpoints = self._endpoints
        count = len(endpoints)
        if count == 0:
            return None
        start = self._next
        for offset in range(count):
            index = (start + offset) % count
            endpoint = endpoints[index]
            if endpoint not in exclude:
                self._next = index + 1
                return endpoint
        # Everything was excluded: go round again rather than give up.
        self._next = start + 1
        return endpoints[start % count]

    def peek(self, exclude: Container[Endpoint] = ()) -> Endpoint | None:
        """What the next ``pick`` would return, without moving on (``userproxy explain``);
        ``pick`` itself stays as it is: it is on every connection's path."""
        position = self._next
        try:
            return self.pick("", exclude)
        finally:
            self._next = position

    def failed(self, client_ip: str, endpoint: Endpoint) -> None:
        """Round-robin keeps no per-client state."""

    def renew(self, endpoints: Sequence[Endpoint]) -> Balancer:
        return RoundRobin(endpoints)
