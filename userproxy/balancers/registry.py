"""Balancer names to implementations, plus plug-ins from the ``userproxy.balancers`` entry
point group.

Every factory, built-in or plug-in, is called as ``factory(endpoints, context)`` and returns
a ``Balancer`` over ``endpoints``; ``context`` is the :class:`BalancerContext` shared by
every pool of the proxy (today: the active connections per endpoint).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points

from userproxy.balancers.affinity import AffinityTables, ClientIPAffinity
from userproxy.balancers.base import Balancer
from userproxy.balancers.least_connections import LeastConnections
from userproxy.balancers.load import EndpointLoad
from userproxy.balancers.maglev import Maglev
from userproxy.balancers.power_of_two import PowerOfTwo
from userproxy.balancers.randomized import RandomChoice
from userproxy.balancers.roundrobin import RoundRobin
from userproxy.model import Endpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BalancerContext:
    """What the proxy shares with every balancer it builds."""

    #: Active connections per endpoint through this proxy (least-connections reads it).
    load: EndpointLoad = field(default_factory=EndpointLoad)
    #: The ClientIP affinity table of each Service port, shared by all the port's pools.
    affinity: AffinityTables = field(default_factory=AffinityTables)


BalancerFactory = Callable[[Sequence[Endpoint], BalancerContext], Balancer]

#: The default balancer when the configuration names none (kube-proxy's userspace and
#: IPVS ``rr`` default); ``BalancerRegistry(default=...)`` takes the configured one.
DEFAULT_BALANCER = "round-robin"

_BUILTIN: dict[str, BalancerFactory] = {
    "round-robin": lambda endpoints, _context: RoundRobin(endpoints),
    "random": lambda endpoints, _context: RandomChoice(endpoints),
    "least-connections": lambda endpoints, context: LeastConnections(endpoints, context.load),
    "power-of-two": lambda endpoints, context: PowerOfTwo(endpoints, context.load),
    "maglev": lambda endpoints, _context: Maglev(endpoints),
}


class UnknownBalancer(ValueError):
    """The default balancer asked for is not registered; the message lists the known names."""


class BalancerRegistry:
    """Resolves a Service's balancer name; unknown names fall back to the default once-warned.

    Invariant: ``default`` is a registered name (``UnknownBalancer`` at construction
    otherwise), so a Service without the annotation always gets a balancer.
    """

    def __init__(
        self,
        extra: dict[str, BalancerFactory] | None = None,
        *,
        default: str = DEFAULT_BALANCER,
    ) -> None:
        self.context = BalancerContext()
        self._factories = dict(_BUILTIN)
        for entry in entry_points(group="userproxy.balancers"):
            try:
                self._factories[entry.name] = entry.load()
            except Exception:
                log.exception("cannot load balancer plug-in %r", entry.name)
        self._factories.update(extra or {})
        self._warned: set[tuple[str, str]] = set()
        if default not in self._factories:
            raise UnknownBalancer(f"unknown balancer {default!r} (known: {', '.join(self.names)})")
        #: The balancer of every Service without the ``userproxy.io/balancer`` annotation.
        self.default = default

    @property
    def names(self) -> list[str]:
        return sorted(self._factories)

    def resolve(self, name: str | None, owner: str = "") -> str:
        """The registered name to use for ``name`` (None or unknown -> the default)."""
        if name is None or name in self._factories:
            return name or self.default
        if (owner, name) not in self._warned:
            self._warned.add((owner, name))
            log.warning(
                "%s: unknown balancer %r in annotation userproxy.io/balancer; using %r (known: %s)",
                owner or "service",
                name,
                self.default,
                ", ".join(self.names),
            )
        return self.default

    def build(
        self, name: str, endpoints: Sequence[Endpoint], affinity_timeout: float | None
    ) -> Balancer:
        """A balancer of kind ``name`` over ``endpoints``, wrapped for ClientIP affinity."""
        balancer = self._factories[name](endpoints, self.context)
        if affinity_timeout is not None:
            return ClientIPAffinity(balancer, affinity_timeout)
        return balancer
