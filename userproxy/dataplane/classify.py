"""Which traffic class a client belongs to, and whether it may connect at all.

kube-proxy treats traffic to NodePorts, external IPs and load-balancer IPs differently by
where it comes from: from the node itself (or, with a cluster CIDR, from a pod) it goes to
the cluster-wide endpoints even under ``externalTrafficPolicy: Local``.  Load-balancer
listeners also honour ``loadBalancerSourceRanges``.  Both checks run once per accepted
connection, before any transport exists.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs)


def in_networks(ip: str, networks: Sequence[Network]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in networks)


class NodeLocal:
    """Answers "is this client on this node (or in the cluster CIDR)?": kube-proxy's
    LocalTrafficDetector (pkg/proxy/util/localdetector.go) with its ``IsLocal``.

    Invariant: loopback clients are always local; ``update`` replaces the set of the
    node's addresses (kept fresh by ``hostnet.node``) and the cluster CIDRs.
    """

    __slots__ = ("_cidrs", "_local")

    def __init__(self) -> None:
        self._local: frozenset[str] = frozenset()
        self._cidrs: tuple[Network, ...] = ()

    def update(self, local_addresses: Iterable[str], cluster_cidrs: Iterable[str] = ()) -> None:
        self._local = frozenset(local_addresses)
        self._cidrs = parse_networks(cluster_cidrs)

    def is_local(self, ip: str) -> bool:
        if ip in self._local or ip.startswith("127.") or ip == "::1":
            return True
        return bool(self._cidrs) and in_networks(ip, self._cidrs)
