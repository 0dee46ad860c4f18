"""A Node change re-plans the Services only when the zone changes (upstream's
NodeTopologyConfig): the zone is the one Node field planning reads; the others feed the
health checks only."""

from __future__ import annotations

from userproxy.balancers.registry import BalancerRegistry
from userproxy.control.proxier import NoEffects, Proxier
from userproxy.control.trackers import ChangeRecorder
from userproxy.model import (
    EndpointPort,
    EndpointSlice,
    IPFamily,
    Node,
    Protocol,
    Service,
    ServicePort,
    SliceEndpoint,
)

NODE = "node-1"
SERVICES = 50


def build() -> tuple[ChangeRecorder, Proxier]:
    recorder = ChangeRecorder(NODE, lambda: None)
    proxier = Proxier(recorder, NoEffects(), BalancerRegistry())
    for i in range(SERVICES):
        name = f"s{i}"
        recorder.on_service_add(
            Service("default", name, cluster_ips=(f"10.96.0.{i + 1}",),
                    ports=(ServicePort("http", Protocol.TCP, 80),))
        )  # fmt: skip
        recorder.on_endpointslice_add(
            EndpointSlice("default", f"{name}-1", name, IPFamily.IPv4,
                          ports=(EndpointPort("http", Protocol.TCP, 8080),),
                          endpoints=(SliceEndpoint("10.0.0.1", zone_hints=frozenset("a")),
                                     SliceEndpoint("10.0.0.2", zone_hints=frozenset("b"))))
        )  # fmt: skip
    recorder.on_node_add(Node(NODE, zone="a"))
    recorder.on_services_synced()
    recorder.on_endpointslices_synced()
    assert proxier.sync()
    assert proxier.status.services_planned == SERVICES
    return recorder, proxier


def test_a_node_change_outside_the_zone_plans_nothing_again() -> None:
    recorder, proxier = build()
    before = dict(proxier.plans)
    recorder.on_node_update(Node(NODE, zone="a"), Node(NODE, zone="a", to_be_deleted_taint=True))
    assert proxier.sync()
    assert proxier.status.services_planned == 0
    assert proxier.state.node == Node(NODE, zone="a", to_be_deleted_taint=True), "health sees it"
    assert proxier.plans == before


def test_a_zone_change_plans_every_service_again() -> None:
    recorder, proxier = build()
    pools = {key: plan.listeners[0].pool.endpoints for key, plan in proxier.plans.items()}
    assert {tuple(e.ip for e in pool) for pool in pools.values()} == {("10.0.0.1",)}
    recorder.on_node_update(Node(NODE, zone="a"), Node(NODE, zone="b"))
    assert proxier.sync()
    assert proxier.status.services_planned == SERVICES
    pools = {key: plan.listeners[0].pool.endpoints for key, plan in proxier.plans.items()}
    assert {tuple(e.ip for e in pool) for pool in pools.values()} == {("10.0.0.2",)}
