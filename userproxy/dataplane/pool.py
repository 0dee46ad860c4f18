"""The backend pool of one listener traffic class: its endpoints and the balancer choosing.

The pool is the only thing the control plane changes under a running listener.  An update
builds the new balancer first and then replaces ``balancer`` in one assignment, so a pick
always sees either the old or the new pool, and established connections (which hold their
own upstream transports) are never touched.

ClientIP affinity: a pool given its ServicePortName takes that port's shared
``AffinityTable`` from the registry's context, so every listener (ClusterIP, NodePort,
externalIP, load balancer) and both traffic classes of the port pin a client alike, as
kube-proxy's per-endpoint "recent" lists do (see ``balancers.affinity``); the listener set
trims that table.  A pool without a ServicePortName keeps a private table that follows
its own endpoints.  Pins outlive a change of balancer or timeout, as kube-proxy's recent
lists outlive a rule rewrite.

Per-endpoint totals (``balancers.load``): a pool holds its endpoints in the shared
``EndpointLoad`` from creation until ``release`` (its listener closed, or the node pool
dropped), and an update moves the hold from the old endpoints to the new, so totals are
kept exactly for endpoints some live pool has.
"""

from __future__ import annotations

from userproxy.balancers.affinity import AffinityTable, ClientIPAffinity
from userproxy.balancers.base import Balancer
from userproxy.balancers.registry import BalancerRegistry
from userproxy.model import PoolSpec, ServicePortName


class BackendPool:
    __slots__ = ("_held", "_private", "_registry", "_spn", "balancer", "spec")

    def __init__(
        self,
        spec: PoolSpec,
        registry: BalancerRegistry,
        spn: ServicePortName | None = None,
    ) -> None:
        self._registry = registry
        self._spn = spn
        self._private: AffinityTable | None = None
        self.spec = spec
        self.balancer: Balancer = self._wrap(
            registry.build(spec.balancer, spec.endpoints, None), spec
        )
        self._held = True
        registry.context.load.hold(spec.endpoints)

    @property
    def empty(self) -> bool:
        return not self.spec.endpoints

    def update(self, spec: PoolSpec, spn: ServicePortName | None = None) -> None:
        """Swap in ``spec``; affinity pins to endpoints that stay are kept.

        ``spn`` (None: unchanged) moves the pool to another Service port's affinity table:
        the listener's port was renamed, and the old name's pins are not this port's."""
        rebind = spn is not None and spn != self._spn
        if spec == self.spec and not rebind:
            return
        if rebind:
            self._spn = spn
        current = self.balancer
        inner = current.inner if isinstance(current, ClientIPAffinity) else current
        if spec.balancer == self.spec.balancer:
            inner = inner.renew(spec.endpoints)
        else:
            inner = self._registry.build(spec.balancer, spec.endpoints, None)
        balancer = self._wrap(inner, spec)
        if self._held and spec.endpoints != self.spec.endpoints:
            load = self._registry.context.load
            # Held before the release: an endpoint in both keeps its totals.
            load.hold(spec.endpoints)
            load.release(self.spec.endpoints)
        self.spec = spec
        self.balancer = balancer

    def release(self) -> None:
        """The pool is no longer used for new connections: let go of its endpoints'
        totals (idempotent; picks still work, for the sessions that keep the pool)."""
        if self._held:
            self._held = False
            self._registry.context.load.release(self.spec.endpoints)

    def _wrap(self, inner: Balancer, spec: PoolSpec) -> Balancer:
        timeout = spec.affinity_timeout
        if timeout is None:
            self._private = None
            return inner
        if self._spn is not None:
            table = self._registry.context.affinity.table(self._spn, timeout)
        elif self._private is None:
            table = self._private = AffinityTable(timeout)
        else:
            table = self._private
            table.timeout = timeout
            table.retain({str(e) for e in spec.endpoints})
        return ClientIPAffinity(inner, table)
