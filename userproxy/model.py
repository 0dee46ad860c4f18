"""userproxy's own model of the Kubernetes objects it proxies for.

Everything here is a frozen, slotted dataclass built at the source boundary (see
``userproxy.sources.decode``) from validated API data.  Nothing downstream of the sources
ever sees a raw API dict, so every field has the type its annotation says and every
invariant stated in a docstring holds.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from dataclasses import dataclass
from typing import Literal


class Protocol(enum.StrEnum):
    """The transport protocol of a Service port (Kubernetes spells these upper-case)."""

    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class IPFamily(enum.StrEnum):
    """An address family as Kubernetes names it in ``ipFamilies`` and ``addressType``."""

    IPv4 = "IPv4"
    IPv6 = "IPv6"

    @staticmethod
    def of(address: str) -> IPFamily:
        """The family of a literal IP address (raises ValueError for anything else)."""
        return parse_ip(address).family


@dataclass(frozen=True, slots=True)
class IPLiteral:
    """A parsed literal IP address.

    ``canonical`` is its standard spelling (``fd00::1`` for ``FD00:0::1``); ``zoned`` says
    it carried an IPv6 zone index (``fe80::1%eth0``), which no Kubernetes address field
    allows.
    """

    canonical: str
    family: IPFamily
    version: int
    value: int
    zoned: bool


@functools.lru_cache(maxsize=1 << 16)
def parse_ip(text: str) -> IPLiteral:
    """The parsed literal IP address ``text``; raises ValueError for anything else.

    The one IP parser cache of the package: parsing with ``ipaddress`` dominated decoding
    large EndpointSlice lists and syncs of large endpoint sets, and the same addresses
    come back at every re-list, reload and sync.  Errors are not cached (rare, and the
    decoder bounds the length of what it parses).
    """
    ip = ipaddress.ip_address(text)
    zoned = isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None
    family = IPFamily.IPv6 if ip.version == 6 else IPFamily.IPv4
    return IPLiteral(str(ip), family, ip.version, int(ip), zoned)


def ip_value(address: str) -> tuple[int, int]:
    """(version, integer value) of a literal IP address, for sorting; raises ValueError."""
    ip = parse_ip(address)
    return (ip.version, ip.value)


class ServiceType(enum.StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"
    EXTERNAL_NAME = "ExternalName"


class TrafficPolicy(enum.StrEnum):
    CLUSTER = "Cluster"
    LOCAL = "Local"


#: Default and maximum of ``sessionAffinityConfig.clientIP.timeoutSeconds``.
DEFAULT_AFFINITY_TIMEOUT = 10800
MAX_AFFINITY_TIMEOUT = 86400

#: Annotation on a Service that names its balancer (see ``userproxy.balancers``).
BALANCER_ANNOTATION = "userproxy.io/balancer"
#: Annotation on a Service asking for a PROXY protocol header (HAProxy's
#: doc/proxy-protocol.txt) on every TCP connection to its endpoints: "v1" or "v2".
PROXY_PROTOCOL_ANNOTATION = "userproxy.io/proxy-protocol"
#: The PROXY protocol versions a listener can send (see dataplane/proxy_protocol.py).
ProxyProtocolVersion = Literal["v1", "v2"]
PROXY_PROTOCOL_VERSIONS: tuple[ProxyProtocolVersion, ...] = ("v1", "v2")


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """The unit kube-proxy proxies: one port of one Service.

    ``port`` is the port's name ("" for the single unnamed port a Service may have).
    """

    namespace: str
    name: str
    port: str
    protocol: Protocol

    def __str__(self) -> str:
        suffix = f":{self.port}" if self.port else ""
        return f"{self.namespace}/{self.name}{suffix}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class ServiceKey:
    """Namespace and name of a Service (the key EndpointSlices point at)."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One entry of ``spec.ports``.

    Invariants: ``1 <= port <= 65535``; ``node_port`` is None or in 1..65535.
    ``target_port`` is informational only: the backend port always comes from the
    EndpointSlice's own port entry with the same name and protocol.
    """

    name: str
    protocol: Protocol
    port: int
    node_port: int | None = None
    target_port: int | str | None = None


@dataclass(frozen=True, slots=True)
class LoadBalancerIngress:
    """One ``status.loadBalancer.ingress`` entry that has an IP.

    ``ip_mode`` is None when unset; only None and "VIP" are captured by the proxy.
    """

    ip: str
    ip_mode: str | None = None


@dataclass(frozen=True, slots=True)
class Service:
    """A v1 Service reduced to what a service proxy needs.

    Invariants: ``cluster_ips`` holds literal IPs (the primary first), or is empty for a
    headless Service; ``ports`` names are unique per protocol; ``affinity_timeout`` is None
    without ClientIP affinity and otherwise in 1..86400 seconds.  ``balancer`` and
    ``proxy_protocol`` are their annotations' values as written (stripped), or None when
    absent: they are checked when planning, where a bad value is reported once and its
    default used (the default balancer; no PROXY header).
    """

    namespace: str
    name: str
    type: ServiceType = ServiceType.CLUSTER_IP
    cluster_ips: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    external_ips: tuple[str, ...] = ()
    load_balancer_ingress: tuple[LoadBalancerIngress, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    internal_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    external_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    health_check_node_port: int | None = None
    affinity_timeout: int | None = None
    balancer: str | None = None
    proxy_protocol: str | None = None

    @property
    def key(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.name)

    @property
    def is_proxied(self) -> bool:
        """False for headless and ExternalName Services, which a service proxy skips."""
        return self.type is not ServiceType.EXTERNAL_NAME and bool(self.cluster_ips)

    @property
    def externally_accessible(self) -> bool:
        """True when the Service has NodePorts, external IPs or load-balancer IPs."""
        return (
            self.type in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER)
            or bool(self.external_ips)
            or bool(self.load_balancer_ingress)
        )

    def port_name(self, port: ServicePort) -> ServicePortName:
        return ServicePortName(self.namespace, self.name, port.name, port.protocol)


@dataclass(frozen=True, slots=True)
class EndpointPort:
    """One entry of an EndpointSlice's ``ports``; ``port`` None means "no port number"."""

    name: str
    protocol: Protocol
    port: int | None


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    """One entry of an EndpointSlice's ``endpoints``, with its conditions resolved.

    ``address`` is ``addresses[0]``.  Unset conditions were resolved at decoding time the
    Kubernetes way: ready and serving default to True, terminating to False.
    ``zone_hints``/``node_hints`` are empty when the endpoint carries no such hints.
    """

    address: str
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    zone_hints: frozenset[str] = frozenset()
    node_hints: frozenset[str] = frozenset()
    #: The name of the pod behind the address (``targetRef`` of kind Pod), for reaching
    #: it through the API server (``userproxy connect``); None when the slice names none.
    pod: str | None = None


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    """A discovery.k8s.io/v1 EndpointSlice of address type IPv4 or IPv6.

    FQDN slices never get this far.  ``trigger_time`` is the
    ``endpoints.kubernetes.io/last-change-trigger-time`` annotation as a UNIX timestamp.
    """

    namespace: str
    name: str
    service_name: str
    address_type: IPFamily
    ports: tuple[EndpointPort, ...] = ()
    endpoints: tuple[SliceEndpoint, ...] = ()
    trigger_time: float | None = None

    @property
    def service_key(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.service_name)


@dataclass(frozen=True, slots=True)
class Node:
    """The proxy's own v1 Node: its zone label and whether it is being removed."""

    name: str
    zone: str | None = None
    deleting: bool = False
    to_be_deleted_taint: bool = False


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A usable backend of one ServicePort: the data plane dials ``(ip, port)``.

    ``is_local`` says the endpoint runs on this node.  The conditions and hints are kept
    so selection rules (``userproxy.control.selection``) can be applied to it.
    """

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    is_local: bool = False
    zone_hints: frozenset[str] = frozenset()
    node_hints: frozenset[str] = frozenset()
    #: The pod behind the address, in the Service's namespace (``SliceEndpoint.pod``).
    pod: str | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.ip, self.port)

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


class AddressKind(enum.StrEnum):
    """Which of a Service's addresses a listener serves."""

    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    EXTERNAL_IP = "ExternalIP"
    LOAD_BALANCER = "LoadBalancer"


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """What a listener balances over: the usable endpoints and how to choose among them.

    ``endpoints`` is already filtered by the selection rules for the listener's traffic
    class; an empty tuple means "refuse new connections".
    """

    endpoints: tuple[Endpoint, ...]
    balancer: str
    affinity_timeout: int | None = None


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """One address the proxy listens on for one ServicePort, and its pools.

    ``pool`` serves clients from outside the node (for a ClusterIP listener: everyone);
    ``node_pool``, on NodePort, externalIP and load-balancer listeners, serves clients on
    the node itself or in the cluster CIDR, which kube-proxy sends to the cluster-wide set
    even with ``externalTrafficPolicy: Local``.  ``source_ranges`` (load-balancer listeners
    only; empty: everyone) are the CIDRs clients must come from.  ``proxy_protocol`` (TCP
    listeners only, else None) is the PROXY protocol version whose header every upstream
    connection starts with; it applies to connections accepted after the spec is applied.
    """

    spn: ServicePortName
    kind: AddressKind
    ip: str
    port: int
    pool: PoolSpec
    node_pool: PoolSpec | None = None
    source_ranges: tuple[str, ...] = ()
    proxy_protocol: ProxyProtocolVersion | None = None

    @property
    def serves_anyone(self) -> bool:
        """False when no client could be served: the listener should not listen at all."""
        return bool(self.pool.endpoints) or bool(
            self.node_pool is not None and self.node_pool.endpoints
        )

    @property
    def key(self) -> tuple[Protocol, str, int]:
        """Listeners are unique per (protocol, ip, port)."""
        return (self.spn.protocol, self.ip, self.port)
