"""The node's own addresses as the proxy needs them, re-read at most once a second.

Two consumers: the proxier (which addresses NodePorts listen on: ``--nodeport-addresses``,
never the service IPs on the proxy's own device) and the listeners' traffic classifier
(which clients are on this node: every local address, plus ``--cluster-cidr``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from userproxy.dataplane.classify import NodeLocal
from userproxy.hostnet.addresses import (
    local_addresses,
    primary_addresses,
    select_nodeport_addresses,
)

#: How often the node's addresses are re-read at most (netlink, in a worker thread).
REFRESH_INTERVAL = 1.0


class NodeAddresses:
    """Callable giving the NodePort addresses; refreshes ``node_local`` on the way."""

    def __init__(
        self,
        node_local: NodeLocal,
        *,
        nodeport_cidrs: Sequence[str] = (),
        cluster_cidrs: Sequence[str] = (),
        own_device: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._node_local = node_local
        self._nodeport_cidrs = tuple(nodeport_cidrs)
        self._cluster_cidrs = tuple(cluster_cidrs)
        self._exclude = (own_device,) if own_device else ()
        self._clock = clock
        self._read_at = float("-inf")
        self._nodeport: tuple[str, ...] = ()

    def __call__(self) -> tuple[str, ...]:
        now = self._clock()
        if now - self._read_at < REFRESH_INTERVAL:
            return self._nodeport
        self._read_at = now
        local = local_addresses()
        self._node_local.update(local, self._cluster_cidrs)
        # Service IPs on the proxy's own device are not node addresses for NodePorts.
        candidates = local_addresses(exclude_devices=self._exclude) if self._exclude else local
        primary = (
            primary_addresses(exclude_devices=self._exclude)
            if "primary" in self._nodeport_cidrs
            else ()
        )
        self._nodeport = select_nodeport_addresses(self._nodeport_cidrs, candidates, primary)
        return self._nodeport
