"""The Balancer protocol every load-balancing policy implements.

A balancer is built for one pool of endpoints and lives as long as that pool: when the
endpoints change, ``dataplane.pool`` swaps in a new one (``Balancer.renew``).
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Protocol

from userproxy.model import Endpoint


class Balancer(Protocol):
    """Chooses an endpoint for a new connection or UDP session.

    Invariants: ``pick`` returns one of ``endpoints`` or None when ``endpoints`` is empty;
    it prefers endpoints not in ``exclude`` and only returns an excluded one when every
    endpoint is excluded (so a retry ladder can walk the whole pool and then go round again).
    """

    @property
    def endpoints(self) -> Sequence[Endpoint]: ...

    def pick(self, client_ip: str, exclude: Container[Endpoint] = ()) -> Endpoint | None: ...

    def failed(self, client_ip: str, endpoint: Endpoint) -> None:
        """A dial from ``client_ip`` to ``endpoint`` failed (affinity forgets the pin)."""

    def renew(self, endpoints: Sequence[Endpoint]) -> Balancer:
        """A balancer of the same kind over ``endpoints``, keeping state that still applies."""
