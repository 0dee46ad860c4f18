"""The proxier's listeners for every Service address kind, with the pools each traffic
class may use, plus health checks, no-local-endpoint counts and service addresses."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest

from tests.support.model import eps, key
from tests.support.recorders import RecordingEffects
from userproxy.balancers.registry import BalancerRegistry
from userproxy.control.proxier import Proxier
from userproxy.control.trackers import ChangeRecorder
from userproxy.model import (
    AddressKind,
    Endpoint,
    ListenerSpec,
    LoadBalancerIngress,
    Protocol,
    Service,
    ServicePort,
    ServiceType,
    SliceEndpoint,
    TrafficPolicy,
)

NODE = "node-1"
NODE_IPS = ("198.18.0.2", "127.0.0.1")


class Setup:
    def __init__(self, node_ips: tuple[str, ...] = NODE_IPS) -> None:
        self.node_ips = node_ips
        self.applier = RecordingEffects()
        self.health = self.applier.health
        self.recorder = ChangeRecorder(NODE, lambda: None)
        self.proxier = Proxier(
            self.recorder,
            self.applier,
            BalancerRegistry(),
            node_addresses=lambda: self.node_ips,
        )
        self.recorder.on_services_synced()
        self.recorder.on_endpointslices_synced()

    def serve(
        self, service: Service, *endpoints: SliceEndpoint
    ) -> dict[tuple[str, int], ListenerSpec]:
        self.recorder.on_service_add(service)
        self.recorder.on_endpointslice_add(eps("web-1", "web", *endpoints))
        self.proxier.sync()
        return self.listeners()

    def listeners(self) -> dict[tuple[str, int], ListenerSpec]:
        specs = self.applier.applied.get(key("web"), ())
        return {(s.ip, s.port): s for s in specs}


BASE = Service(
    "default",
    "web",
    cluster_ips=("10.96.0.10",),
    ports=(ServicePort("http", Protocol.TCP, 80, node_port=30080),),
)


def web(**fields: Any) -> Service:
    return dataclasses.replace(BASE, **fields)


LOCAL = SliceEndpoint("10.244.1.5", node_name=NODE)
REMOTE = SliceEndpoint("10.244.2.7", node_name="node-2")


def ips(pool_endpoints: Sequence[Endpoint]) -> set[str]:
    return {e.ip for e in pool_endpoints}


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        pytest.param(web(), {("10.96.0.10", 80): AddressKind.CLUSTER_IP}, id="cluster-ip-only"),
        pytest.param(
            web(type=ServiceType.NODE_PORT),
            {
                ("10.96.0.10", 80): AddressKind.CLUSTER_IP,
                ("198.18.0.2", 30080): AddressKind.NODE_PORT,
                ("127.0.0.1", 30080): AddressKind.NODE_PORT,
            },
            id="node-port-on-every-node-address",
        ),
        pytest.param(
            web(external_ips=("192.0.2.9",)),
            {
                ("10.96.0.10", 80): AddressKind.CLUSTER_IP,
                ("192.0.2.9", 80): AddressKind.EXTERNAL_IP,
            },
            id="external-ip-even-for-cluster-ip-type",
        ),
        pytest.param(
            web(
                type=ServiceType.LOAD_BALANCER,
                load_balancer_ingress=(
                    LoadBalancerIngress("203.0.113.1"),
                    LoadBalancerIngress("203.0.113.2", "VIP"),
                    LoadBalancerIngress("203.0.113.3", "Proxy"),
                ),
            ),
            {
                ("10.96.0.10", 80): AddressKind.CLUSTER_IP,
                ("198.18.0.2", 30080): AddressKind.NODE_PORT,
                ("127.0.0.1", 30080): AddressKind.NODE_PORT,
                ("203.0.113.1", 80): AddressKind.LOAD_BALANCER,
                ("203.0.113.2", 80): AddressKind.LOAD_BALANCER,
            },
            id="lb-vips-but-not-ipmode-proxy",
        ),
        pytest.param(
            web(external_ips=("2001:db8::9",)),
            {("10.96.0.10", 80): AddressKind.CLUSTER_IP},
            id="external-ip-of-a-family-the-service-lacks",
        ),
    ],
)
def test_listeners_per_address_kind(
    service: Service, expected: dict[tuple[str, int], AddressKind]
) -> None:
    listeners = Setup().serve(service, LOCAL, REMOTE)
    assert {address: spec.kind for address, spec in listeners.items()} == expected


@pytest.mark.parametrize(
    ("etp", "itp", "cluster_ip_pool", "external_pool", "node_pool"),
    [
        pytest.param("Cluster", "Cluster", {LOCAL.address, REMOTE.address},
                     {LOCAL.address, REMOTE.address}, {LOCAL.address, REMOTE.address},
                     id="cluster-policies"),
        pytest.param("Local", "Cluster", {LOCAL.address, REMOTE.address}, {LOCAL.address},
                     {LOCAL.address, REMOTE.address}, id="etp-local"),
        pytest.param("Cluster", "Local", {LOCAL.address}, {LOCAL.address, REMOTE.address},
                     {LOCAL.address, REMOTE.address}, id="itp-local"),
    ],
)  # fmt: skip
def test_traffic_classes(
    etp: str, itp: str, cluster_ip_pool: set[str], external_pool: set[str], node_pool: set[str]
) -> None:
    service = web(
        type=ServiceType.NODE_PORT,
        external_traffic_policy=TrafficPolicy(etp),
        internal_traffic_policy=TrafficPolicy(itp),
    )
    listeners = Setup().serve(service, LOCAL, REMOTE)
    cluster = listeners[("10.96.0.10", 80)]
    node_port = listeners[("198.18.0.2", 30080)]
    assert ips(cluster.pool.endpoints) == cluster_ip_pool
    assert cluster.node_pool is None
    assert ips(node_port.pool.endpoints) == external_pool
    assert node_port.node_pool is not None
    assert ips(node_port.node_pool.endpoints) == node_pool


def test_source_ranges_only_on_load_balancer_listeners() -> None:
    service = web(
        type=ServiceType.LOAD_BALANCER,
        external_ips=("192.0.2.9",),
        load_balancer_ingress=(LoadBalancerIngress("203.0.113.1"),),
        load_balancer_source_ranges=("198.18.1.0/24",),
    )
    listeners = Setup().serve(service, LOCAL)
    assert listeners[("203.0.113.1", 80)].source_ranges == ("198.18.1.0/24",)
    assert listeners[("192.0.2.9", 80)].source_ranges == ()
    assert listeners[("198.18.0.2", 30080)].source_ranges == ()
    assert listeners[("10.96.0.10", 80)].source_ranges == ()


def test_type_changes_add_and_remove_only_the_concerned_listeners() -> None:
    setup = Setup()
    first = setup.serve(web(), LOCAL)
    assert set(first) == {("10.96.0.10", 80)}
    setup.recorder.on_service_update(web(), web(type=ServiceType.NODE_PORT))
    setup.proxier.sync()
    second = setup.listeners()
    assert set(second) == {("10.96.0.10", 80), ("198.18.0.2", 30080), ("127.0.0.1", 30080)}
    assert second[("10.96.0.10", 80)] == first[("10.96.0.10", 80)]
    setup.recorder.on_service_update(web(type=ServiceType.NODE_PORT), web())
    setup.proxier.sync()
    assert setup.listeners() == first


def test_new_node_address_replans_node_ports() -> None:
    setup = Setup(node_ips=("198.18.0.2",))
    setup.serve(web(type=ServiceType.NODE_PORT), LOCAL)
    setup.node_ips = ("198.18.0.2", "198.18.5.5")
    setup.proxier.sync()  # a periodic sync with no object change
    assert ("198.18.5.5", 30080) in setup.listeners()


def test_health_check_and_no_local_endpoint_counts() -> None:
    setup = Setup()
    service = web(
        type=ServiceType.LOAD_BALANCER,
        external_traffic_policy=TrafficPolicy.LOCAL,
        health_check_node_port=32000,
    )
    setup.serve(service, LOCAL, REMOTE)
    web_key = key("web")
    assert setup.health == [({web_key: 32000}, {web_key: 1})]
    assert setup.proxier.status.no_local_external == 0
    # The local endpoint leaves: 0 local endpoints, counted as a Local policy without any.
    setup.recorder.on_endpointslice_update(
        eps("web-1", "web", LOCAL, REMOTE), eps("web-1", "web", REMOTE)
    )
    setup.proxier.sync()
    assert setup.health[-1] == ({web_key: 32000}, {})  # no local endpoint
    assert setup.proxier.status.no_local_external == 1
    assert setup.proxier.status.no_local_internal == 0
    setup.recorder.on_service_delete(service)
    setup.proxier.sync()
    ports, _ = setup.health[-1]
    assert web_key not in ports


def test_service_addresses_cover_cluster_external_and_vip_ips() -> None:
    setup = Setup()
    setup.serve(
        web(
            type=ServiceType.LOAD_BALANCER,
            external_ips=("192.0.2.9",),
            load_balancer_ingress=(
                LoadBalancerIngress("203.0.113.1"),
                LoadBalancerIngress("203.0.113.3", "Proxy"),
            ),
        ),
        LOCAL,
    )
    assert setup.proxier.service_addresses() == {"10.96.0.10", "192.0.2.9", "203.0.113.1"}
