"""Builders for the model values the control-plane tests feed the recorder: a Service,
its EndpointSlices and their endpoints, in namespace ``default``, with the defaults most
tests want (one TCP port "http" 80 -> 8080) and keywords for the rest."""

from __future__ import annotations

from collections.abc import Sequence

from userproxy.model import (
    EndpointPort,
    EndpointSlice,
    IPFamily,
    Protocol,
    Service,
    ServiceKey,
    ServicePort,
    ServicePortName,
    ServiceType,
    SliceEndpoint,
    TrafficPolicy,
)

NS = "default"
HTTP = ServicePort("http", Protocol.TCP, 80)
#: A second, UDP port: a Service with ``(HTTP, DNS)`` is served by slices built with
#: ``more_ports=(DNS_TARGET,)``.
DNS = ServicePort("dns", Protocol.UDP, 53)
DNS_TARGET = EndpointPort("dns", Protocol.UDP, 5353)


def svc(
    name: str = "web",
    ips: tuple[str, ...] = ("10.96.0.1",),
    ports: tuple[ServicePort, ...] = (HTTP,),
    *,
    type: ServiceType = ServiceType.CLUSTER_IP,
    external_ips: tuple[str, ...] = (),
    internal_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER,
    affinity_timeout: int | None = None,
    balancer: str | None = None,
) -> Service:
    return Service(
        NS,
        name,
        type=type,
        cluster_ips=ips,
        ports=ports,
        external_ips=external_ips,
        internal_traffic_policy=internal_traffic_policy,
        affinity_timeout=affinity_timeout,
        balancer=balancer,
    )


def sep(
    ip: str,
    *,
    ready: bool = True,
    node: str | None = None,
    zones: Sequence[str] = (),
) -> SliceEndpoint:
    return SliceEndpoint(ip, ready=ready, node_name=node, zone_hints=frozenset(zones))


def eps(
    name: str,
    service: str,
    *endpoints: SliceEndpoint,
    family: IPFamily = IPFamily.IPv4,
    port: int = 8080,
    more_ports: tuple[EndpointPort, ...] = (),
    trigger: float | None = None,
) -> EndpointSlice:
    """A slice of ``service`` with port "http" on ``port`` (and ``more_ports``)."""
    return EndpointSlice(
        NS,
        name,
        service,
        family,
        ports=(EndpointPort("http", Protocol.TCP, port), *more_ports),
        endpoints=endpoints,
        trigger_time=trigger,
    )


def key(name: str) -> ServiceKey:
    return ServiceKey(NS, name)


def spn(name: str, port: str = "http") -> ServicePortName:
    return ServicePortName(NS, name, port, Protocol.TCP)
