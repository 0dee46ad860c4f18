"""Turn a Service's EndpointSlices into the endpoints of each of its ServicePorts.

The rules (upstream ``pkg/proxy/endpointslicecache.go``,
``endpointInfoByServicePort`` and ``addEndpoints``):

* The key is ``(ServicePortName, IPFamily)``: each family of a dual-stack Service is served
  from the slices of that family only. Slices of a family the Service has no cluster IP of
  are ignored, and so are endpoints whose address is not of the slice's family.
* The backend port is the number in the *slice's* ``ports[]`` entry with the same name and
  protocol as the Service port, never a resolved ``targetPort``: two slices may carry
  different numbers for one port name, each applies to its own endpoints. Entries without a
  port number (None, or 0) are skipped, as are entries matching no Service port.
* An endpoint is local when its ``nodeName`` equals this node's (non-empty) name.
* Duplicate ``ip:port`` entries within a key: the first one seen wins (slices are visited
  in name order), unless it is terminating and a later one is not.

Every Service port gets a key for every family of the Service, so a port whose slices carry
no matching entry (or no endpoints) maps to an empty tuple rather than being absent: callers
can tell "no endpoints" (refuse connections) from "not a port of this Service".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeAlias

from userproxy.model import (
    Endpoint,
    EndpointSlice,
    IPFamily,
    Protocol,
    Service,
    ServicePortName,
    SliceEndpoint,
    ip_value,
)

#: The key of a ServicePort's endpoints of one address family.
EndpointsKey: TypeAlias = tuple[ServicePortName, IPFamily]


def service_families(service: Service) -> tuple[IPFamily, ...]:
    """The families of the Service's cluster IPs, primary first, without repeats."""
    return tuple(dict.fromkeys(IPFamily.of(ip) for ip in service.cluster_ips))


def build_endpoints(
    service: Service, slices: Iterable[EndpointSlice], node_name: str
) -> dict[EndpointsKey, tuple[Endpoint, ...]]:
    """Map each ``(ServicePortName, family)`` of ``service`` to its endpoints.

    ``slices`` should be the slices of ``service``; others (by ``service_key``) are ignored.
    Each tuple is sorted by (IP, port). See the module docstring for the rules.
    """
    families = service_families(service)
    port_names: dict[tuple[str, Protocol], ServicePortName] = {
        (port.name, port.protocol): service.port_name(port) for port in service.ports
    }
    found: dict[EndpointsKey, dict[tuple[str, int], Endpoint]] = {
        (spn, family): {} for spn in port_names.values() for family in families
    }

    for eps in sorted(slices, key=lambda s: s.name):
        if eps.service_key != service.key or eps.address_type not in families:
            continue
        for slice_port in eps.ports:
            spn = port_names.get((slice_port.name, slice_port.protocol))
            # upstream also skips port 0 ("Ignoring invalid endpoint port")
            if spn is None or not slice_port.port:
                continue
            by_address = found[(spn, eps.address_type)]
            for slice_ep in eps.endpoints:
                if _family_of(slice_ep.address) is not eps.address_type:
                    continue
                endpoint = _endpoint(slice_ep, slice_port.port, node_name)
                previous = by_address.get(endpoint.address)
                if previous is None or (previous.terminating and not endpoint.terminating):
                    by_address[endpoint.address] = endpoint

    return {
        key: tuple(sorted(by_address.values(), key=_sort_key)) for key, by_address in found.items()
    }


def _endpoint(slice_ep: SliceEndpoint, port: int, node_name: str) -> Endpoint:
    return Endpoint(
        ip=slice_ep.address,
        port=port,
        ready=slice_ep.ready,
        serving=slice_ep.serving,
        terminating=slice_ep.terminating,
        is_local=bool(node_name) and slice_ep.node_name == node_name,
        zone_hints=slice_ep.zone_hints,
        node_hints=slice_ep.node_hints,
        pod=slice_ep.pod,
    )


def _family_of(address: str) -> IPFamily | None:
    try:
        return IPFamily.of(address)
    except ValueError:
        return None


def _sort_key(endpoint: Endpoint) -> tuple[int, int, int]:
    version, value = ip_value(endpoint.ip)
    return (version, value, endpoint.port)
