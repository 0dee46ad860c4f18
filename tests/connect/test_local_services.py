"""``LocalServices``: how a cluster's Service becomes the one served on this machine, and
what the control plane is told (a consistent add/update/delete history)."""

from __future__ import annotations

import dataclasses
from typing import Any

from tests.support.model import DNS, HTTP, NS, eps, sep, svc
from userproxy.connect.addresses import AddressBook
from userproxy.connect.local_services import LocalServices
from userproxy.connect.summary import render
from userproxy.model import (
    EndpointSlice,
    Protocol,
    Service,
    ServicePort,
    ServiceType,
    SliceEndpoint,
    TrafficPolicy,
)


class Calls:
    """A ``Handlers`` that records every call as (method name, arguments)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda *args: self.calls.append((name, args))

    def take(self) -> list[tuple[str, tuple[Any, ...]]]:
        calls, self.calls = self.calls, []
        return calls


def _local(**kw: Any) -> tuple[LocalServices, Calls]:
    calls = Calls()
    changes: list[None] = []
    services = LocalServices(
        calls,
        AddressBook("127.0.250.0/24"),
        on_change=lambda: changes.append(None),
        **kw,
    )
    return services, calls


def test_a_service_gets_a_loopback_address_tcp_ports_and_cluster_policies() -> None:
    services, calls = _local()
    web = dataclasses.replace(
        svc("web", ports=(HTTP, DNS)),
        type=ServiceType.LOAD_BALANCER,
        external_ips=("192.0.2.7",),
        internal_traffic_policy=TrafficPolicy.LOCAL,
        external_traffic_policy=TrafficPolicy.LOCAL,
        health_check_node_port=30001,
    )
    services.on_service_add(web)
    [(method, (served,))] = calls.take()
    assert method == "on_service_add"
    local = services.services[(NS, "web")]
    assert served.cluster_ips == (local.address,)
    assert local.address is not None
    assert local.address.startswith("127.0.250.")
    assert served.type is ServiceType.CLUSTER_IP
    assert served.ports == (dataclasses.replace(HTTP, node_port=None),)
    assert served.external_ips == ()
    assert served.load_balancer_ingress == ()
    assert served.internal_traffic_policy is TrafficPolicy.CLUSTER
    assert served.external_traffic_policy is TrafficPolicy.CLUSTER
    assert served.health_check_node_port is None
    assert local.notes == ("53/UDP: not forwardable (the API's port-forward is TCP only)",)


def test_privileged_ports_move_up_by_the_offset_unless_taken() -> None:
    services, calls = _local(low_port_limit=1024, offset=10000)
    ports = (
        ServicePort("http", Protocol.TCP, 80),
        ServicePort("alt", Protocol.TCP, 10080),  # where 80 would go: 80 cannot move
        ServicePort("https", Protocol.TCP, 443),
        ServicePort("app", Protocol.TCP, 8080),
    )
    services.on_service_add(svc("web", ports=ports))
    [(_, (served,))] = calls.take()
    assert [p.port for p in served.ports] == [10080, 10443, 8080]
    local = services.services[(NS, "web")]
    assert [(p.port, p.local) for p in local.ports] == [(10080, 10080), (443, 10443), (8080, 8080)]
    assert local.notes == ("80/TCP: cannot be moved up by 10000 (taken or > 65535)",)


def test_names_and_the_bare_name_in_the_primary_namespace_only() -> None:
    services, _ = _local(primary_namespace="team")
    services.on_service_add(svc("web"))
    address = services.services[(NS, "web")].address
    assert services.names == {
        "web.default": address,
        "web.default.svc": address,
        "web.default.svc.cluster.local": address,
    }
    other = dataclasses.replace(svc("api"), namespace="team")
    services.on_service_add(other)
    assert services.names["api"] == services.services[("team", "api")].address
    assert services.hosts_entries()[str(address)] == [
        "web.default", "web.default.svc", "web.default.svc.cluster.local"
    ]  # fmt: skip


def test_updates_and_deletes_pass_on_what_was_delivered() -> None:
    services, calls = _local()
    services.on_service_add(svc("web"))
    [(_, (first,))] = calls.take()
    services.on_service_update(
        svc("web"), svc("web", ports=(HTTP, ServicePort("b", Protocol.TCP, 81)))
    )
    [(method, (old, new))] = calls.take()
    assert method == "on_service_update"
    assert old == first
    assert len(new.ports) == 2
    # Headless now: not served, so the control plane sees a delete of what it had.
    services.on_service_update(svc("web"), dataclasses.replace(svc("web"), cluster_ips=()))
    assert calls.take() == [("on_service_delete", (new,))]
    assert services.names == {}
    assert services.services[(NS, "web")].notes == ("headless: no cluster IP to serve",)
    # Served again: an add; deleted: a delete, the address released.
    services.on_service_update(svc("web"), svc("web"))
    [(method, (again,))] = calls.take()
    assert method == "on_service_add"
    services.on_service_delete(svc("web"))
    assert calls.take() == [("on_service_delete", (again,))]
    assert services.names == {}
    assert len(services.book) == 0


def test_external_name_is_listed_not_served() -> None:
    services, calls = _local()
    services.on_service_add(dataclasses.replace(svc("ext"), type=ServiceType.EXTERNAL_NAME))
    assert calls.take() == []
    assert services.services[(NS, "ext")].notes == ("ExternalName: no cluster IP to serve",)


def _pod(ip: str, pod: str | None, ready: bool = True) -> SliceEndpoint:
    return dataclasses.replace(sep(ip, ready=ready), pod=pod)


def test_endpoints_without_a_pod_are_left_out_through_the_port_forward() -> None:
    services, calls = _local()
    services.on_service_add(svc("web"))
    calls.take()
    endpoint_slice = eps("web-a", "web", _pod("10.1.0.1", "web-1"), _pod("10.1.0.2", None))
    services.on_endpointslice_add(endpoint_slice)
    [(_, (served,))] = calls.take()
    assert [e.pod for e in served.endpoints] == ["web-1"]
    updated = eps("web-a", "web", _pod("10.1.0.1", "web-1"), _pod("10.1.0.3", "web-3", False))
    services.on_endpointslice_update(endpoint_slice, updated)
    [(method, (old, new))] = calls.take()
    assert method == "on_endpointslice_update"
    assert old == served
    assert new == updated
    assert services.ready_pods((NS, "web")) == ("web-1",)  # web-3 is not ready
    services.on_endpointslice_delete(updated)
    assert calls.take() == [("on_endpointslice_delete", (updated,))]
    assert services.ready_pods((NS, "web")) == ()


def test_direct_keeps_endpoints_without_a_pod() -> None:
    services, calls = _local(by_pod=False)
    endpoint_slice: EndpointSlice = eps("web-a", "web", _pod("10.1.0.2", None))
    services.on_endpointslice_add(endpoint_slice)
    assert calls.take() == [("on_endpointslice_add", (endpoint_slice,))]
    services.on_service_add(svc("web"))
    assert services.ready_pods((NS, "web")) == ("10.1.0.2",)


def test_the_summary_lists_address_ports_pods_and_notes() -> None:
    services, _ = _local(low_port_limit=1024)
    services.on_service_add(svc("web", ports=(ServicePort("http", Protocol.TCP, 80), DNS)))
    services.on_endpointslice_add(eps("web-a", "web", _pod("10.1.0.1", "web-1")))
    services.on_service_add(Service(NS, "empty", cluster_ips=("10.96.0.9",)))
    text = render(services)
    address = services.services[(NS, "web")].address
    lines = text.splitlines()
    assert lines[0].split() == ["SERVICE", "ADDRESS", "TCP", "PORTS", "READY", "PODS"]
    web = next(line for line in lines if line.strip().startswith("web.default"))
    assert web.split() == ["web.default", str(address), "80->10080", "web-1"]
    empty = next(line for line in lines if line.strip().startswith("empty.default"))
    assert empty.split()[2:] == ["-", "(none)"]
    assert "  web.default: 53/UDP: not forwardable" in text
