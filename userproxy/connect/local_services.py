"""The cluster's Services as ``userproxy connect`` serves them on this machine.

Between the source and the control plane (it implements ``Handlers`` and passes every
call on): each Service becomes a local one, so the ordinary planning and data path serve
it (control/plan.py, dataplane/):

- its one address is a loopback address of its own (``AddressBook``), its only address
  kind a ClusterIP: NodePorts, external and load-balancer IPs are the cluster's business;
- its ports are its TCP ports; a port below the unprivileged limit
  (``net.ipv4.ip_unprivileged_port_start``, 1024 by default), without the privilege to
  bind it, is moved up by ``offset`` (80 -> 10080); UDP and SCTP ports are left out, with
  a note (the API's port-forward is TCP only);
- both traffic policies are Cluster: this machine is not a node, so "Local" would leave
  nothing to serve; no health-check NodePort;
- through the port-forward, an endpoint without a pod (no ``targetRef``) cannot be
  reached: it is left out of its slice, with a note once per endpoint.

Headless and ExternalName Services have no address to proxy: they are listed, not served.

Invariants: ``services`` holds one ``LocalService`` per Service the source has delivered
(served or not), keyed by (namespace, name); ``names`` maps every name of a served
Service to its address and is updated in place (the DNS responder reads it live); what
this passes on is what it delivered before (``old`` of an update is the local Service or
slice passed on last), so the control plane sees a consistent history.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from userproxy.connect.addresses import AddressBook, AddressesExhausted, ServiceName
from userproxy.connect.hosts_file import names_for
from userproxy.control.handlers import Handlers
from userproxy.model import (
    EndpointSlice,
    Node,
    Protocol,
    Service,
    ServicePort,
    ServiceType,
    TrafficPolicy,
)

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_PORT_OFFSET", "LocalPort", "LocalService", "LocalServices"]

#: What a privileged port is moved up by: 80 -> 10080, 443 -> 10443, 53 -> 10053.
DEFAULT_PORT_OFFSET = 10000


@dataclass(frozen=True, slots=True)
class LocalPort:
    """A Service port and where it listens here (``local`` differs when moved up)."""

    name: str
    port: int
    local: int


@dataclass(frozen=True, slots=True)
class LocalService:
    """One Service of the cluster as served here: ``address`` None when not served."""

    namespace: str
    name: str
    address: str | None
    ports: tuple[LocalPort, ...] = ()
    #: Why each left-out part is left out ("53/UDP: not forwardable ...").
    notes: tuple[str, ...] = ()


class LocalServices:
    """Translates the source's Services and slices for ``handlers`` (see the module).

    ``low_port_limit``: ports below it are moved up by ``offset`` (pass 0 when this
    process may bind any port); ``by_pod``: endpoints are reached through their pod (the
    port-forward), so endpoints without one are left out; ``primary_namespace``: whose
    Services also answer to their bare name; ``on_change()`` is called after any change
    of what is served or of its ready pods."""

    def __init__(
        self,
        handlers: Handlers,
        book: AddressBook,
        *,
        low_port_limit: int = 0,
        offset: int = DEFAULT_PORT_OFFSET,
        by_pod: bool = True,
        primary_namespace: str = "default",
        cluster_domain: str = "cluster.local",
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.handlers = handlers
        self.book = book
        self.low_port_limit = low_port_limit
        self.offset = offset
        self.by_pod = by_pod
        self.primary_namespace = primary_namespace
        self.cluster_domain = cluster_domain
        self.on_change = on_change
        self.services: dict[ServiceName, LocalService] = {}
        self.names: dict[str, str] = {}
        self._delivered: dict[ServiceName, Service] = {}
        #: What was delivered of each EndpointSlice, by its Service and its name.
        self._slices: dict[ServiceName, dict[str, EndpointSlice]] = {}
        self._podless_noted: set[tuple[str, str, str]] = set()

    # -- Services ---------------------------------------------------------------------------
    def on_service_add(self, service: Service) -> None:
        self._service(service)

    def on_service_update(self, old: Service, new: Service) -> None:
        self._service(new)

    def on_service_delete(self, service: Service) -> None:
        key = (service.namespace, service.name)
        local = self.services.pop(key, None)
        delivered = self._delivered.pop(key, None)
        if delivered is not None:
            self.handlers.on_service_delete(delivered)
        self.book.release(key)
        if local is not None:
            self._set_names(local, None)
            self.on_change()

    def on_services_synced(self) -> None:
        self.handlers.on_services_synced()

    def _service(self, service: Service) -> None:
        key = (service.namespace, service.name)
        before = self.services.get(key)
        local, served = self._localize(service)
        self.services[key] = local
        delivered = self._delivered.get(key)
        if served is not None and delivered is not None:
            self._delivered[key] = served
            self.handlers.on_service_update(delivered, served)
        elif served is not None:
            self._delivered[key] = served
            self.handlers.on_service_add(served)
        elif delivered is not None:
            del self._delivered[key]
            self.handlers.on_service_delete(delivered)
        if before != local:
            self._set_names(before, local)
            self.on_change()

    def _localize(self, service: Service) -> tuple[LocalService, Service | None]:
        key = (service.namespace, service.name)
        notes: list[str] = []
        if service.type is ServiceType.EXTERNAL_NAME or not service.is_proxied:
            self.book.release(key)
            why = "ExternalName" if service.type is ServiceType.EXTERNAL_NAME else "headless"
            notes.append(f"{why}: no cluster IP to serve")
            local = LocalService(service.namespace, service.name, None, (), tuple(notes))
            return local, None
        try:
            address = self.book.assign(key)
        except AddressesExhausted as exc:
            notes.append(f"not served: {exc}")
            local = LocalService(service.namespace, service.name, None, (), tuple(notes))
            return local, None
        ports: list[LocalPort] = []
        served_ports: list[ServicePort] = []
        taken = {p.port for p in service.ports if p.protocol is Protocol.TCP}
        for port in service.ports:
            shown = f"{port.port}/{port.protocol}"
            if port.protocol is not Protocol.TCP:
                notes.append(f"{shown}: not forwardable (the API's port-forward is TCP only)")
                continue
            local_port = port.port
            if port.port < self.low_port_limit:
                local_port = port.port + self.offset
                if local_port > 65535 or local_port in taken:
                    notes.append(f"{shown}: cannot be moved up by {self.offset} (taken or > 65535)")
                    continue
                taken.add(local_port)
            ports.append(LocalPort(port.name, port.port, local_port))
            served_ports.append(dataclasses.replace(port, port=local_port, node_port=None))
        served = dataclasses.replace(
            service,
            type=ServiceType.CLUSTER_IP,
            cluster_ips=(address,),
            ports=tuple(served_ports),
            external_ips=(),
            load_balancer_ingress=(),
            load_balancer_source_ranges=(),
            internal_traffic_policy=TrafficPolicy.CLUSTER,
            external_traffic_policy=TrafficPolicy.CLUSTER,
            health_check_node_port=None,
        )
        local = LocalService(service.namespace, service.name, address, tuple(ports), tuple(notes))
        return local, served

    def _set_names(self, before: LocalService | None, after: LocalService | None) -> None:
        if before is not None and before.address is not None:
            for name in self.names_of(before):
                if self.names.get(name) == before.address:
                    del self.names[name]
        if after is not None and after.address is not None:
            for name in self.names_of(after):
                self.names[name] = after.address

    def names_of(self, service: LocalService) -> list[str]:
        """The names ``service`` answers to: ``svc.ns``, ``svc.ns.svc``, ``svc.ns.svc.<cluster
        domain>``, and the bare ``svc`` in the primary namespace (as inside its pods)."""
        names = names_for(service.namespace, service.name, self.cluster_domain)
        if service.namespace != self.primary_namespace:
            names = names[1:]
        return [name.lower() for name in names]

    def hosts_entries(self) -> dict[str, list[str]]:
        """Address -> names of every served Service, for the hosts file."""
        return {
            local.address: self.names_of(local)
            for local in self.services.values()
            if local.address is not None
        }

    # -- EndpointSlices ---------------------------------------------------------------------
    def on_endpointslice_add(self, endpoint_slice: EndpointSlice) -> None:
        self._replace(None, endpoint_slice)

    def on_endpointslice_update(self, old: EndpointSlice, new: EndpointSlice) -> None:
        self._replace(old, new)

    def on_endpointslice_delete(self, endpoint_slice: EndpointSlice) -> None:
        self._replace(endpoint_slice, None)

    def _replace(self, old: EndpointSlice | None, new: EndpointSlice | None) -> None:
        """Pass on the change from what was delivered for ``old`` to ``new``'s reachable
        part (None: absent); ``on_change()`` when a Service's ready pods changed."""
        keys = {(s.namespace, s.service_name) for s in (old, new) if s is not None}
        ready = {key: self.ready_pods(key) for key in keys}
        before = self._pop(old) if old is not None else None
        served = None
        if new is not None:
            served = self._reachable(new)
            self._slices.setdefault((new.namespace, new.service_name), {})[new.name] = served
        if before is not None and served is not None:
            self.handlers.on_endpointslice_update(before, served)
        elif served is not None:
            self.handlers.on_endpointslice_add(served)
        elif before is not None:
            self.handlers.on_endpointslice_delete(before)
        if any(self.ready_pods(key) != was for key, was in ready.items() if key in self.services):
            self.on_change()

    def _pop(self, endpoint_slice: EndpointSlice) -> EndpointSlice | None:
        """Forget what was delivered for ``endpoint_slice``; what that was."""
        service = (endpoint_slice.namespace, endpoint_slice.service_name)
        slices = self._slices.get(service)
        if slices is None:
            return None
        delivered = slices.pop(endpoint_slice.name, None)
        if not slices:
            del self._slices[service]
        return delivered

    def ready_pods(self, service: ServiceName) -> tuple[str, ...]:
        """The ready pods of ``service`` among what is served (an endpoint without a pod,
        with ``--direct``: its address)."""
        slices = self._slices.get(service, {}).values()
        return tuple(sorted({e.pod or e.address for s in slices for e in s.endpoints if e.ready}))

    def on_endpointslices_synced(self) -> None:
        self.handlers.on_endpointslices_synced()

    def _reachable(self, endpoint_slice: EndpointSlice) -> EndpointSlice:
        """``endpoint_slice`` without the endpoints this machine cannot reach."""
        if not self.by_pod:
            return endpoint_slice
        kept = tuple(e for e in endpoint_slice.endpoints if e.pod is not None)
        if len(kept) == len(endpoint_slice.endpoints):
            return endpoint_slice
        for endpoint in endpoint_slice.endpoints:
            noted = (endpoint_slice.namespace, endpoint_slice.service_name, endpoint.address)
            if endpoint.pod is None and noted not in self._podless_noted:
                self._podless_noted.add(noted)
                log.warning(
                    "%s/%s: endpoint %s left out: it names no pod (targetRef), and only a "
                    "pod can be reached through the API server's port-forward",
                    endpoint_slice.namespace,
                    endpoint_slice.service_name,
                    endpoint.address,
                )
        return dataclasses.replace(endpoint_slice, endpoints=kept)

    # -- Nodes: this machine is no node; the source delivers none -------------------------------
    def on_node_add(self, node: Node) -> None:
        self.handlers.on_node_add(node)

    def on_node_update(self, old: Node, new: Node) -> None:
        self.handlers.on_node_update(old, new)

    def on_node_delete(self, node: Node) -> None:
        self.handlers.on_node_delete(node)

    def on_node_synced(self) -> None:
        self.handlers.on_node_synced()
