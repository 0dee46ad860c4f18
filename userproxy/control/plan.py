"""Planning: which address of a Service gets which pool of endpoints.

This is the heart of a service proxy, and it is a pure function of the applied state:
``plan_service`` takes one Service, its EndpointSlices and what the proxy knows of its own
node, and returns the :class:`ServicePlan` the data plane should serve.  Each step below is
one decision, in the order kube-proxy makes them (``pkg/proxy/iptables/proxier.go``,
``syncProxyRules``, per service port):

1. the endpoints per (ServicePort, IP family): ``build_endpoints`` (control/endpoints.py);
2. the endpoint sets per traffic class: ``categorize`` (control/selection.py, after
   ``pkg/proxy/topology.go``'s ``CategorizeEndpoints``);
3. the addresses to listen on, per address kind: :func:`listen_addresses`;
4. the pools each address kind serves: :func:`pools` (the table below);
5. the health check and the "no local endpoints" counts: :func:`health_check_port`,
   :func:`no_local_endpoints`;
6. (userproxy's own) the PROXY protocol header its TCP listeners send: :func:`proxy_protocol`.

Which pool serves whom (a client is "on the node" when it comes from an address of this
node or of ``--cluster-cidr``; see dataplane/classify.py)::

    address kind            client on the node        client from elsewhere
    ClusterIP               internal                  internal
    NodePort / externalIP /  cluster                  external
      load-balancer IP

    internal = cluster, or local with internalTrafficPolicy: Local
    external = cluster, or local with externalTrafficPolicy: Local
    cluster  = ready endpoints passing the topology filter (else serving-and-terminating)
    local    = ready endpoints on this node (else serving-and-terminating ones there)

An empty pool refuses new connections (kube-proxy's REJECT); a listener none of whose pools
has an endpoint is not opened at all (``ListenerSpec.serves_anyone``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from userproxy.control.endpoint_counts import EndpointCount, count_endpoints
from userproxy.control.endpoints import build_endpoints
from userproxy.control.selection import EndpointSets, categorize
from userproxy.model import (
    PROXY_PROTOCOL_ANNOTATION,
    PROXY_PROTOCOL_VERSIONS,
    AddressKind,
    EndpointSlice,
    IPFamily,
    ListenerSpec,
    PoolSpec,
    Protocol,
    ProxyProtocolVersion,
    Service,
    ServiceKey,
    ServicePort,
    ServiceType,
    TrafficPolicy,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServicePlan:
    """Everything one Service asks of the data plane after a sync."""

    listeners: tuple[ListenerSpec, ...] = ()
    #: ``healthCheckNodePort`` of an ``externalTrafficPolicy: Local`` load balancer.
    health_check_port: int | None = None
    #: Distinct node-local ready endpoint IPs over all ports (the health check's
    #: ``localEndpoints``, upstream ``LocalReadyEndpoints``): one pod counts once.
    local_endpoints: int = 0
    #: Service ports with a Local policy and no local endpoints, per policy.
    no_local_internal: int = 0
    no_local_external: int = 0
    #: The Service's own IPs (cluster, external, load-balancer VIPs) to make local.
    addresses: frozenset[str] = frozenset()
    #: Endpoints by state per Service port (all families, before any traffic policy).
    endpoint_counts: tuple[EndpointCount, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeView:
    """What planning needs to know of the proxy's own node."""

    name: str
    #: The Node's ``topology.kubernetes.io/zone`` label (None: unknown), for zone hints.
    zone: str | None = None
    #: The addresses NodePorts listen on (``--nodeport-addresses`` applied).
    nodeport_addresses: tuple[str, ...] = ()


def plan_service(
    service: Service, slices: Iterable[EndpointSlice], node: NodeView, balancer: str
) -> ServicePlan:
    """What ``service`` wants of the data plane now (``balancer``: the resolved name)."""
    if not service.is_proxied:
        return ServicePlan()
    endpoints = build_endpoints(service, slices, node.name)
    families = {IPFamily.of(ip) for ip in service.cluster_ips}
    lb_ips = vip_ingress_ips(service)
    header = proxy_protocol(service)
    listeners: dict[tuple[object, ...], ListenerSpec] = {}
    # Distinct IPs, as upstream's EndpointsMap.LocalReadyEndpoints counts them: one pod
    # behind a two-port Service is one local endpoint, not one per (ip, port).
    local_ready: set[str] = set()
    no_local_internal = no_local_external = 0
    counts: list[EndpointCount] = []
    for port in service.ports:
        spn = service.port_name(port)
        counts.append(
            count_endpoints(spn, (e for f in families for e in endpoints.get((spn, f), ())))
        )
        sets = {
            family: categorize(endpoints.get((spn, family), ()), service, node.name, node.zone)
            for family in families
        }
        for family_sets in sets.values():
            local_ready.update(e.ip for e in family_sets.local if e.ready)
        internal, external = no_local_endpoints(service, sets.values())
        no_local_internal += internal
        no_local_external += external
        for kind, ip, number in listen_addresses(service, port, node.nodeport_addresses, lb_ips):
            chosen = sets.get(IPFamily.of(ip))
            if chosen is None:
                continue  # an address of a family the Service does not have
            pool, node_pool = pools(kind, chosen, balancer, service.affinity_timeout)
            ranges = service.load_balancer_source_ranges if ip in lb_ips else ()
            # TCP only: a UDP session gets no header (docs/configuration.md says why).
            version = header if port.protocol is Protocol.TCP else None
            spec = ListenerSpec(
                spn, kind, ip, number, pool, node_pool, ranges, proxy_protocol=version
            )
            listeners.setdefault(spec.key, spec)
    return ServicePlan(
        listeners=tuple(listeners.values()),
        health_check_port=health_check_port(service),
        local_endpoints=len(local_ready),
        no_local_internal=no_local_internal,
        no_local_external=no_local_external,
        addresses=frozenset((*service.cluster_ips, *service.external_ips, *lb_ips)),
        endpoint_counts=tuple(counts),
    )


def vip_ingress_ips(service: Service) -> tuple[str, ...]:
    """The load-balancer ingress IPs the proxy serves, in order: ``ipMode`` unset or VIP.
    With ``ipMode: Proxy`` traffic reaches the node through the real load balancer instead."""
    return tuple(
        ingress.ip for ingress in service.load_balancer_ingress if ingress.ip_mode in (None, "VIP")
    )


def listen_addresses(
    service: Service, port: ServicePort, nodeport_addresses: Iterable[str], lb_ips: Sequence[str]
) -> Iterator[tuple[AddressKind, str, int]]:
    """(kind, ip, port number) of every address ``port`` is served on: cluster IPs, node
    addresses, external IPs, load-balancer IPs.  An IP that is both an external IP and a
    load-balancer IP is a load-balancer address (its source ranges apply)."""
    for ip in service.cluster_ips:
        yield AddressKind.CLUSTER_IP, ip, port.port
    if port.node_port is not None and service.type in (
        ServiceType.NODE_PORT,
        ServiceType.LOAD_BALANCER,
    ):
        for ip in nodeport_addresses:
            yield AddressKind.NODE_PORT, ip, port.node_port
    for ip in (*service.external_ips, *lb_ips):
        kind = AddressKind.LOAD_BALANCER if ip in lb_ips else AddressKind.EXTERNAL_IP
        yield kind, ip, port.port


def pools(
    kind: AddressKind, sets: EndpointSets, balancer: str, affinity: int | None
) -> tuple[PoolSpec, PoolSpec | None]:
    """(pool, node_pool) of a listener of ``kind``: the table in the module docstring."""
    if kind is AddressKind.CLUSTER_IP:
        return PoolSpec(sets.internal, balancer, affinity), None
    return PoolSpec(sets.external, balancer, affinity), PoolSpec(sets.cluster, balancer, affinity)


def no_local_endpoints(service: Service, sets: Iterable[EndpointSets]) -> tuple[bool, bool]:
    """(internal, external): whether a Local traffic policy of ``service`` finds no local
    endpoint in some family (kubeproxy_sync_proxy_rules_no_local_endpoints_total)."""
    missing = any(not s.local for s in sets)
    internal = service.internal_traffic_policy is TrafficPolicy.LOCAL and missing
    external = (
        service.externally_accessible
        and service.external_traffic_policy is TrafficPolicy.LOCAL
        and missing
    )
    return internal, external


def health_check_port(service: Service) -> int | None:
    """``healthCheckNodePort``, served only for ``externalTrafficPolicy: Local`` load
    balancers (upstream serves it for exactly those Services)."""
    if (
        service.type is ServiceType.LOAD_BALANCER
        and service.external_traffic_policy is TrafficPolicy.LOCAL
    ):
        return service.health_check_node_port
    return None


#: (Service, value) pairs already reported by :func:`proxy_protocol`; cleared when it grows
#: past this many, so a stream of distinct bad values costs bounded memory (and a value
#: may then be reported again: a repeat, never a silence).
MAX_WARNED = 4096
_warned: set[tuple[ServiceKey, str]] = set()


def proxy_protocol(service: Service) -> ProxyProtocolVersion | None:
    """The PROXY protocol version ``service``'s annotation asks for, None for none.

    A value other than "v1" or "v2" sends none, and is reported with a warning naming the
    Service and the value, once per Service and value (planning runs at every sync that
    touches the Service).  The annotation is userproxy's; kube-proxy has no equivalent.
    """
    value = service.proxy_protocol
    if value is None:
        return None
    for version in PROXY_PROTOCOL_VERSIONS:
        if value == version:
            return version
    key = (service.key, value)
    if key not in _warned:
        if len(_warned) >= MAX_WARNED:
            _warned.clear()
        _warned.add(key)
        log.warning(
            "%s: annotation %s has value %r; expected %s; no PROXY protocol header is sent",
            service.key,
            PROXY_PROTOCOL_ANNOTATION,
            value[:64],
            " or ".join(repr(v) for v in PROXY_PROTOCOL_VERSIONS),
        )
    return None
