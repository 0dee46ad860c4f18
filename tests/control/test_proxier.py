"""The proxier: from recorded changes to the listener specs handed to the listener set."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import pytest

from tests.support.clock import FakeClock
from tests.support.model import DNS, DNS_TARGET, HTTP, NS, eps, key, sep, spn, svc
from tests.support.recorders import RecordingEffects
from userproxy.balancers.registry import BalancerRegistry
from userproxy.control.plan import ServicePlan
from userproxy.control.proxier import Proxier, SyncStatus
from userproxy.control.trackers import ChangeRecorder
from userproxy.model import (
    AddressKind,
    Endpoint,
    IPFamily,
    ListenerSpec,
    Node,
    PoolSpec,
    Protocol,
    ServiceKey,
    ServicePort,
    ServiceType,
    SliceEndpoint,
    TrafficPolicy,
)

NODE = "node-1"


@dataclass
class World:
    recorder: ChangeRecorder
    proxier: Proxier
    applier: RecordingEffects
    time: FakeClock
    wall: FakeClock
    planned: list[ServiceKey]
    synced: list[SyncStatus]

    def init(self) -> None:
        self.recorder.on_services_synced()
        self.recorder.on_endpointslices_synced()

    def sync(self) -> dict[ServiceKey, tuple[ListenerSpec, ...]]:
        self.planned.clear()
        self.proxier.sync()
        return self.applier.take()


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> World:
    time, wall = FakeClock(100.0), FakeClock(1_700_000_000.0)
    applier = RecordingEffects()
    recorder = ChangeRecorder(NODE, lambda: None, clock=time.now)
    synced = applier.statuses
    proxier = Proxier(recorder, applier, BalancerRegistry(), clock=time.now, wall_clock=wall.now)
    planned: list[ServiceKey] = []
    plan = proxier.plan

    def recording_plan(key: ServiceKey) -> ServicePlan:
        planned.append(key)
        return plan(key)

    monkeypatch.setattr(proxier, "plan", recording_plan)
    return World(recorder, proxier, applier, time, wall, planned, synced)


def endpoint(ip: str, port: int = 8080) -> Endpoint:
    return Endpoint(ip, port)


def spec(
    name: str,
    ip: str,
    endpoints: tuple[Endpoint, ...],
    *,
    port: int = 80,
    balancer: str = "round-robin",
    affinity: int | None = None,
) -> ListenerSpec:
    return ListenerSpec(
        spn(name), AddressKind.CLUSTER_IP, ip, port, PoolSpec(endpoints, balancer, affinity)
    )


def pool_ips(specs: tuple[ListenerSpec, ...]) -> list[list[str]]:
    return [[e.ip for e in s.pool.endpoints] for s in specs]


# -- initialization and the first sync ----------------------------------------------------


def test_nothing_applied_before_initialized(world: World) -> None:
    world.recorder.on_service_add(svc())
    world.recorder.on_endpointslice_add(eps("web-1", "web", sep("10.1.0.1")))
    world.recorder.on_services_synced()
    assert world.sync() == {}
    assert world.proxier.status.syncs == 0
    assert world.synced == []
    world.recorder.on_endpointslices_synced()
    applied = world.sync()
    assert applied == {key("web"): (spec("web", "10.96.0.1", (endpoint("10.1.0.1"),)),)}
    assert world.proxier.status.syncs == 1


def test_first_sync_applies_every_proxied_service(world: World) -> None:
    rec = world.recorder
    rec.on_service_add(svc("web"))
    rec.on_service_add(svc("empty", ips=("10.96.0.2",)))
    rec.on_service_add(svc("headless", ips=()))
    rec.on_service_add(svc("ext", ips=(), type=ServiceType.EXTERNAL_NAME))
    rec.on_service_add(svc("ext-with-ip", ips=("10.96.0.3",), type=ServiceType.EXTERNAL_NAME))
    rec.on_endpointslice_add(eps("web-1", "web", sep("10.1.0.2"), sep("10.1.0.1")))
    rec.on_endpointslice_add(eps("headless-1", "headless", sep("10.1.0.9")))
    world.init()
    applied = world.sync()
    assert applied == {
        key("web"): (spec("web", "10.96.0.1", (endpoint("10.1.0.1"), endpoint("10.1.0.2"))),),
        # no endpoints yet: a listener that refuses, not no listener
        key("empty"): (spec("empty", "10.96.0.2", ()),),
    }
    assert set(world.proxier.specs) == {key("web"), key("empty")}


def test_first_sync_with_nothing_to_proxy_still_counts(world: World) -> None:
    world.init()
    assert world.sync() == {}
    assert world.proxier.status.syncs == 1
    assert len(world.synced) == 1


def _started(world: World) -> None:
    """Two Services with endpoints, initialized and synced once."""
    rec = world.recorder
    rec.on_service_add(svc("web"))
    rec.on_service_add(svc("api", ips=("10.96.0.2",)))
    rec.on_endpointslice_add(eps("web-1", "web", sep("10.1.0.1")))
    rec.on_endpointslice_add(eps("api-1", "api", sep("10.1.1.1")))
    world.init()
    assert set(world.sync()) == {key("web"), key("api")}


# -- incremental syncs ----------------------------------------------------------------------


def test_service_change_replans_only_that_service(world: World) -> None:
    _started(world)
    old, new = svc("web"), svc("web", ports=(replace(HTTP, port=8000),))
    world.recorder.on_service_update(old, new)
    applied = world.sync()
    assert world.planned == [key("web")]
    assert applied == {key("web"): (spec("web", "10.96.0.1", (endpoint("10.1.0.1"),), port=8000),)}


def test_sync_without_changes_plans_nothing(world: World) -> None:
    _started(world)
    assert world.sync() == {}
    assert world.planned == []
    assert world.proxier.status.syncs == 2


def test_service_change_with_equal_result_applies_nothing(world: World) -> None:
    _started(world)
    # targetPort is informational (the slice's port number is used): nothing changes.
    renamed = (ServicePort("http", Protocol.TCP, 80, target_port="web"),)
    world.recorder.on_service_update(svc("web"), svc("web", ports=renamed))
    assert world.sync() == {}
    assert world.planned == [key("web")]


@pytest.mark.parametrize(
    "extra",
    [
        sep("10.1.0.5", ready=False),
        SliceEndpoint("10.1.0.6", ready=False, serving=False, terminating=True),
        SliceEndpoint("not-an-ip"),
        SliceEndpoint("fd00::1"),
    ],
    ids=["not-ready", "terminating-not-serving", "bad-address", "wrong-family"],
)
def test_slice_change_without_usable_difference_applies_nothing(
    world: World, extra: SliceEndpoint
) -> None:
    _started(world)
    old = eps("web-1", "web", sep("10.1.0.1"))
    new = eps("web-1", "web", sep("10.1.0.1"), extra)
    world.recorder.on_endpointslice_update(old, new)
    assert world.sync() == {}
    assert world.planned == [key("web")]


def test_slice_change_with_a_new_ready_endpoint_applies(world: World) -> None:
    _started(world)
    old = eps("web-1", "web", sep("10.1.0.1"))
    new = eps("web-1", "web", sep("10.1.0.1"), sep("10.1.0.3"))
    world.recorder.on_endpointslice_update(old, new)
    applied = world.sync()
    assert pool_ips(applied[key("web")]) == [["10.1.0.1", "10.1.0.3"]]
    assert list(applied) == [key("web")]


def test_slice_moving_between_services(world: World) -> None:
    _started(world)
    old = eps("web-1", "web", sep("10.1.0.1"))
    moved = eps("web-1", "api", sep("10.1.0.1"))
    world.recorder.on_endpointslice_update(old, moved)
    applied = world.sync()
    assert sorted(world.planned, key=str) == [key("api"), key("web")]
    assert applied[key("web")] == (spec("web", "10.96.0.1", ()),)
    assert pool_ips(applied[key("api")]) == [["10.1.0.1", "10.1.1.1"]]
    assert world.proxier.state.slices[key("api")].keys() == {(NS, "api-1"), (NS, "web-1")}
    assert key("web") not in world.proxier.state.slices


def test_slice_deleted(world: World) -> None:
    _started(world)
    world.recorder.on_endpointslice_delete(eps("api-1", "api", sep("10.1.1.1")))
    assert world.sync() == {key("api"): (spec("api", "10.96.0.2", ()),)}
    assert key("api") not in world.proxier.state.slices


def test_service_deletion_applies_an_empty_tuple(world: World) -> None:
    _started(world)
    world.recorder.on_service_delete(svc("web"))
    applied = world.sync()
    assert applied == {key("web"): ()}
    assert key("web") not in world.proxier.specs
    assert key("web") not in world.proxier.state.services
    # The slices stay: a Service re-created with the same name gets them back.
    world.recorder.on_service_add(svc("web"))
    assert pool_ips(world.sync()[key("web")]) == [["10.1.0.1"]]


def test_service_becoming_headless_applies_an_empty_tuple(world: World) -> None:
    _started(world)
    world.recorder.on_service_update(svc("web"), svc("web", ips=()))
    assert world.sync() == {key("web"): ()}
    assert key("web") not in world.proxier.specs


def test_deleting_a_service_never_applied_applies_nothing(world: World) -> None:
    world.recorder.on_service_add(svc("headless", ips=()))
    world.init()
    assert world.sync() == {}
    world.recorder.on_service_delete(svc("headless", ips=()))
    assert world.sync() == {}


# -- the node, topology, families, traffic policies ------------------------------------------


def test_node_zone_change_replans_services_with_topology_hints(world: World) -> None:
    rec = world.recorder
    rec.on_node_add(Node(NODE, zone="zone-a"))
    rec.on_service_add(svc("hinted"))
    rec.on_service_add(svc("plain", ips=("10.96.0.2",)))
    rec.on_endpointslice_add(
        eps(
            "hinted-1",
            "hinted",
            sep("10.1.0.1", zones=["zone-a"]),
            sep("10.1.0.2", zones=["zone-b"]),
        )
    )
    rec.on_endpointslice_add(eps("plain-1", "plain", sep("10.1.1.1"), sep("10.1.1.2")))
    world.init()
    first = world.sync()
    assert pool_ips(first[key("hinted")]) == [["10.1.0.1"]]
    assert pool_ips(first[key("plain")]) == [["10.1.1.1", "10.1.1.2"]]

    rec.on_node_update(Node(NODE, zone="zone-a"), Node(NODE, zone="zone-b"))
    applied = world.sync()
    assert sorted(world.planned, key=str) == [key("hinted"), key("plain")]
    assert list(applied) == [key("hinted")], "only the hinted Service's listeners change"
    assert pool_ips(applied[key("hinted")]) == [["10.1.0.2"]]
    assert world.proxier.state.node == Node(NODE, zone="zone-b")

    rec.on_node_update(Node(NODE, zone="zone-b"), Node(NODE, zone="zone-c"))
    applied = world.sync()
    assert pool_ips(applied[key("hinted")]) == [["10.1.0.1", "10.1.0.2"]], "no hint: all"


def test_other_nodes_do_not_replan(world: World) -> None:
    _started(world)
    world.recorder.on_node_add(Node("node-2", zone="zone-z"))
    assert world.sync() == {}
    assert world.planned == []


def test_dual_stack_service_gets_a_listener_per_cluster_ip(world: World) -> None:
    rec = world.recorder
    rec.on_service_add(svc("dual", ips=("10.96.0.1", "fd00:96::1")))
    rec.on_endpointslice_add(eps("dual-v4", "dual", sep("10.1.0.1"), port=8080))
    rec.on_endpointslice_add(
        eps("dual-v6", "dual", sep("fd00:1::1"), family=IPFamily.IPv6, port=8443)
    )
    world.init()
    applied = world.sync()
    assert applied == {
        key("dual"): (
            spec("dual", "10.96.0.1", (endpoint("10.1.0.1", 8080),)),
            spec("dual", "fd00:96::1", (endpoint("fd00:1::1", 8443),)),
        )
    }
    # Dropping the IPv6 slice empties only the IPv6 listener's pool.
    rec.on_endpointslice_delete(
        eps("dual-v6", "dual", sep("fd00:1::1"), family=IPFamily.IPv6, port=8443)
    )
    assert pool_ips(world.sync()[key("dual")]) == [["10.1.0.1"], []]


def test_multiple_ports_each_get_listeners(world: World) -> None:
    world.recorder.on_service_add(svc("two", ports=(HTTP, DNS)))
    world.recorder.on_endpointslice_add(
        eps("two-1", "two", sep("10.1.0.1"), more_ports=(DNS_TARGET,))
    )
    world.init()
    specs = world.sync()[key("two")]
    assert [(s.spn.protocol, s.port, s.pool.endpoints[0].port) for s in specs] == [
        (Protocol.TCP, 80, 8080),
        (Protocol.UDP, 53, 5353),
    ]


@pytest.mark.parametrize(
    ("endpoints", "expected"),
    [
        ((sep("10.1.0.1", node=NODE), sep("10.1.0.2", node="node-2")), ["10.1.0.1"]),
        ((sep("10.1.0.1", node="node-2"), sep("10.1.0.2", node="node-3")), []),
        ((sep("10.1.0.1", node=NODE, ready=False), sep("10.1.0.2", node="node-2")), []),
    ],
    ids=["local-and-remote", "remote-only-drops", "local-not-ready-drops"],
)
def test_internal_traffic_policy_local_uses_local_endpoints_only(
    world: World, endpoints: tuple[SliceEndpoint, ...], expected: list[str]
) -> None:
    world.recorder.on_service_add(svc("local", internal_traffic_policy=TrafficPolicy.LOCAL))
    world.recorder.on_endpointslice_add(eps("local-1", "local", *endpoints))
    world.init()
    specs = world.sync()[key("local")]
    assert pool_ips(specs) == [expected]
    assert all(e.is_local for e in specs[0].pool.endpoints)


def test_affinity_timeout_reaches_the_pool(world: World) -> None:
    world.recorder.on_service_add(svc("sticky", affinity_timeout=600, balancer="random"))
    world.init()
    (only,) = world.sync()[key("sticky")]
    assert only.pool == PoolSpec((), "random", 600)


def test_unknown_balancer_falls_back_to_round_robin_with_one_warning(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    odd = svc("odd", balancer="least-magic")
    world.recorder.on_service_add(odd)
    world.recorder.on_endpointslice_add(eps("odd-1", "odd", sep("10.1.0.1")))
    world.init()
    (first,) = world.sync()[key("odd")]
    assert first.pool.balancer == "round-robin"
    # Re-plan the same Service twice more: the warning is not repeated.
    world.recorder.on_endpointslice_update(
        eps("odd-1", "odd", sep("10.1.0.1")), eps("odd-1", "odd", sep("10.1.0.2"))
    )
    (second,) = world.sync()[key("odd")]
    assert second.pool.balancer == "round-robin"
    world.recorder.on_service_update(odd, replace(odd, ports=(replace(HTTP, port=81),)))
    world.sync()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "least-magic" in warnings[0].getMessage()
    assert "default/odd" in warnings[0].getMessage()


# -- SyncStatus -------------------------------------------------------------------------------


def test_sync_status(world: World) -> None:
    rec, time, wall = world.recorder, world.time, world.wall
    wall.advance(60.0)  # the changes below happen after the proxier started
    time.set(100.0)
    rec.on_service_add(svc("web"))
    time.set(101.0)
    rec.on_endpointslice_add(eps("web-1", "web", sep("10.1.0.1"), trigger=wall.now() - 2.5))
    rec.on_endpointslice_add(eps("web-2", "web", sep("10.1.0.2"), trigger=wall.now() - 0.5))
    rec.on_endpointslice_add(eps("web-3", "web", sep("10.1.0.3")))
    world.init()
    time.set(103.0)
    world.sync()
    status = world.proxier.status
    assert status.syncs == 1
    assert status.last_queued_at == 100.0
    assert status.last_sync_at == 103.0
    assert status.last_duration == 0.0
    assert status.services_changed == 1
    assert status.slices_changed == 3
    assert status.programming_delays == pytest.approx([2.5, 0.5])
    assert world.synced == [status]

    # A sync with nothing queued clears the per-sync fields.
    time.set(110.0)
    world.sync()
    status = world.proxier.status
    assert status.syncs == 2
    assert status.last_queued_at is None
    assert status.last_sync_at == 110.0
    assert status.services_changed == 0
    assert status.slices_changed == 0
    assert status.programming_delays == []
    assert len(world.synced) == 2


def test_programming_delay_never_negative(world: World) -> None:
    world.recorder.on_endpointslice_add(
        eps("web-1", "web", sep("10.1.0.1"), trigger=world.wall.now() + 5.0)
    )
    world.init()
    world.sync()
    assert world.proxier.status.programming_delays == [0.0]


def test_trigger_times_from_before_the_start_are_not_measured(world: World) -> None:
    """Slices listed at start-up carry the trigger time of changes made long before the
    proxy ran; upstream ignores trigger times not after the tracker's start time
    (``pkg/proxy/endpointschangetracker.go``, ``t.After(ect.trackerStartTime)``), else every
    restart would record hours-long network programming latencies."""
    started = world.wall.now()
    world.recorder.on_endpointslice_add(
        eps("old-1", "old", sep("10.1.0.1"), trigger=started - 86_400.0)
    )
    world.wall.set(started + 1.0)
    world.recorder.on_endpointslice_add(eps("new-1", "new", sep("10.1.0.2"), trigger=started + 0.5))
    world.init()
    world.wall.set(started + 2.0)
    world.sync()
    assert world.proxier.status.programming_delays == pytest.approx([1.5])


# -- the health check's localEndpoints ----------------------------------------------------


@pytest.mark.parametrize(
    ("endpoints", "expected"),
    [
        ((sep("10.1.0.1", node=NODE),), 1),
        ((sep("10.1.0.1", node=NODE), sep("10.1.0.2", node=NODE)), 2),
        ((sep("10.1.0.1", node=NODE), sep("10.1.0.2", node="node-2")), 1),
        ((sep("10.1.0.1", node=NODE, ready=False),), 0),
    ],
    ids=["one-pod", "two-pods", "one-local-one-remote", "local-not-ready"],
)
def test_local_endpoints_counts_distinct_ips_not_ip_port_pairs(
    world: World, endpoints: tuple[SliceEndpoint, ...], expected: int
) -> None:
    """Upstream's EndpointsMap.LocalReadyEndpoints collects local ready IPs in a set per
    Service: one pod behind a two-port Service is one local endpoint, not two."""
    service = replace(
        svc("lb", ports=(HTTP, DNS), type=ServiceType.LOAD_BALANCER),
        external_traffic_policy=TrafficPolicy.LOCAL,
        health_check_node_port=30999,
    )
    world.recorder.on_service_add(service)
    world.recorder.on_endpointslice_add(eps("lb-1", "lb", *endpoints, more_ports=(DNS_TARGET,)))
    world.init()
    world.sync()
    plan = world.proxier.plans[key("lb")]
    assert plan.health_check_port == 30999
    assert plan.local_endpoints == expected
