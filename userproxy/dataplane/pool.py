"""The backend pool of one listener: its endpoints and the balancer choosing among them.

The pool is the only thing the control plane changes under a running listener.  An update
builds the new balancer first and then replaces ``balancer`` in one assignment, so a pick
always sees either the old or the new pool, and established connections (which hold their
own upstream transports) are never touched.
"""

from __future__ import annotations

from userproxy.balancers.base import Balancer
from userproxy.balancers.registry import BalancerRegistry
from userproxy.model import PoolSpec


class BackendPool:
    __slots__ = ("_registry", "balancer", "spec")

    def __init__(self, spec: PoolSpec, registry: BalancerRegistry) -> None:
        self._registry = registry
        self.spec = spec
        self.balancer: Balancer = registry.build(
            spec.balancer, spec.endpoints, spec.affinity_timeout
        )

    @property
    def empty(self) -> bool:
        return not self.spec.endpoints

    def update(self, spec: PoolSpec) -> None:
        """Swap in ``spec``; affinity pins to endpoints that stay are kept."""
        if spec == self.spec:
            return
        if (spec.balancer, spec.affinity_timeout) == (
            self.spec.balancer,
            self.spec.affinity_timeout,
        ):
            balancer = self.balancer.renew(spec.endpoints)
        else:
            balancer = self._registry.build(spec.balancer, spec.endpoints, spec.affinity_timeout)
        self.spec = spec
        self.balancer = balancer
