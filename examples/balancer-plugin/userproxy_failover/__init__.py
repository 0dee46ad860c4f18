"""``failover``: an example userproxy balancer plug-in (active/standby).

Every new connection goes to the primary: the first endpoint of the pool in address order
(IP, then port), so every node picks the same one.  A failed dial marks that endpoint down
for ``RETRY_AFTER`` seconds and the next one in order takes over; when the time is up the
primary is tried again.  IPVS's weighted failover scheduler (``fo``) with equal weights.

The contract it keeps (userproxy's ``Balancer`` protocol, docs/balancers.md):

- ``pick`` returns an endpoint of ``endpoints`` (None only for an empty pool), prefers
  endpoints not in ``exclude`` and returns an excluded one only when all are excluded (the
  dial ladder then goes round again);
- it never blocks and allocates nothing per pick: one pass over a tuple, one clock read
  when something is marked down;
- ``renew`` keeps what still applies (down marks of endpoints that stay);
- state is bounded by the pool: ``_down`` holds endpoints of the pool only.

Registered by the entry point ``failover = "userproxy_failover:factory"`` in the group
``userproxy.balancers`` (pyproject.toml); userproxy calls ``factory(endpoints, context)``.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Container, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # For the type checker only: at run time the plug-in needs nothing of userproxy, a
    # Balancer being a Protocol (a shape, not a base class).
    from userproxy.balancers.base import Balancer
    from userproxy.balancers.registry import BalancerContext
    from userproxy.model import Endpoint

__all__ = ["RETRY_AFTER", "Failover", "factory"]

#: Seconds an endpoint whose dial failed is passed over before it is tried again.
RETRY_AFTER = 10.0


def _order(endpoint: Endpoint) -> tuple[int, int, int]:
    address = ipaddress.ip_address(endpoint.ip)
    return (address.version, int(address), endpoint.port)


class Failover:
    """Active/standby over ``endpoints``: the first one in address order that is not down."""

    __slots__ = ("_clock", "_down", "_endpoints")

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        clock: Callable[[], float] = time.monotonic,
        down: dict[Endpoint, float] | None = None,
    ) -> None:
        # Sorted once per pool change, not per pick.
        self._endpoints: tuple[Endpoint, ...] = tuple(sorted(endpoints, key=_order))
        self._clock = clock
        members = set(self._endpoints)
        #: Endpoint -> the monotonic time until which it is passed over.
        self._down: dict[Endpoint, float] = {
            endpoint: until for endpoint, until in (down or {}).items() if endpoint in members
        }

    @property
    def endpoints(self) -> Sequence[Endpoint]:
        return self._endpoints

    def pick(self, client_ip: str, exclude: Container[Endpoint] = ()) -> Endpoint | None:
        if not self._endpoints:
            return None
        down = self._down
        now = self._clock() if down else 0.0
        fallback: Endpoint | None = None
        for endpoint in self._endpoints:
            if endpoint in exclude:
                continue
            until = down.get(endpoint)
            if until is None or until <= now:
                return endpoint
            if fallback is None:
                fallback = endpoint  # down, but better than an excluded one
        # Every endpoint is down or excluded: a down one not excluded, else go round again.
        return fallback if fallback is not None else self._endpoints[0]

    def failed(self, client_ip: str, endpoint: Endpoint) -> None:
        if endpoint in self._endpoints:
            self._down[endpoint] = self._clock() + RETRY_AFTER

    def renew(self, endpoints: Sequence[Endpoint]) -> Balancer:
        return Failover(endpoints, self._clock, self._down)


def factory(endpoints: Sequence[Endpoint], context: BalancerContext) -> Balancer:
    """The entry point: userproxy calls it for each pool of a Service that selects
    ``failover``.  ``context`` (the proxy's shared state, e.g. active connections per
    endpoint) is not needed by this policy."""
    return Failover(endpoints)
