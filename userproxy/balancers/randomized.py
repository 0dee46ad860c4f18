"""Uniform random choice: no shared cursor, so it suits many independent proxies."""

from __future__ import annotations

import random
from collections.abc import Container, Sequence

from userproxy.balancers.base import Balancer
from userproxy.model import Endpoint


class RandomChoice:
    __slots__ = ("_endpoints", "_rng")

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random | None = None) -> None:
        self._endpoints: tuple[Endpoint, ...] = tuple(endpoints)
        self._rng = rng or random.Random()

    @property
    def endpoints(self) -> Sequence[Endpoint]:
        return self._endpoints

    def pick(self, client_ip: str, exclude: Container[Endpoint] = ()) -> Endpoint | None:
        if not self._endpoints:
            return None
        candidates = [e for e in self._endpoints if e not in exclude] or self._endpoints
        return self._rng.choice(candidates)

    def failed(self, client_ip: str, endpoint: Endpoint) -> None:
        """Random choice keeps no per-client state."""

    def renew(self, endpoints: Sequence[Endpoint]) -> Balancer:
        return RandomChoice(endpoints, self._rng)
