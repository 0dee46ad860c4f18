"""Balancer names to implementations, plus plug-ins from the ``userproxy.balancers`` entry
point group (each entry point names a callable taking the endpoint sequence)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from userproxy.balancers.affinity import ClientIPAffinity
from userproxy.balancers.base import Balancer
from userproxy.balancers.randomized import RandomChoice
from userproxy.balancers.roundrobin import RoundRobin
from userproxy.model import Endpoint

log = logging.getLogger(__name__)

BalancerFactory = Callable[[Sequence[Endpoint]], Balancer]

DEFAULT_BALANCER = "round-robin"

_BUILTIN: dict[str, BalancerFactory] = {"round-robin": RoundRobin, "random": RandomChoice}


class BalancerRegistry:
    """Resolves a Service's balancer name; unknown names fall back to the default once-warned."""

    def __init__(self, extra: dict[str, BalancerFactory] | None = None) -> None:
        self._factories = dict(_BUILTIN)
        for entry in entry_points(group="userproxy.balancers"):
            try:
                self._factories[entry.name] = entry.load()
            except Exception:
                log.exception("cannot load balancer plug-in %r", entry.name)
        self._factories.update(extra or {})
        self._warned: set[tuple[str, str]] = set()

    @property
    def names(self) -> list[str]:
        return sorted(self._factories)

    def resolve(self, name: str | None, owner: str = "") -> str:
        """The registered name to use for ``name`` (None or unknown -> the default)."""
        if name is None or name in self._factories:
            return name or DEFAULT_BALANCER
        if (owner, name) not in self._warned:
            self._warned.add((owner, name))
            log.warning(
                "%s: unknown balancer %r in annotation userproxy.io/balancer; using %r (known: %s)",
                owner or "service",
                name,
                DEFAULT_BALANCER,
                ", ".join(self.names),
            )
        return DEFAULT_BALANCER

    def build(
        self, name: str, endpoints: Sequence[Endpoint], affinity_timeout: float | None
    ) -> Balancer:
        """A balancer of kind ``name`` over ``endpoints``, wrapped for ClientIP affinity."""
        balancer = self._factories[name](endpoints)
        if affinity_timeout is not None:
            return ClientIPAffinity(balancer, affinity_timeout)
        return balancer
