"""Health rules (2 x syncPeriod, node eligibility) with injected clocks, and the HTTP
answers of /healthz and /livez."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.support.clock import FakeClock
from tests.support.recorders import RecordingEffects
from userproxy.admin.health import health_app
from userproxy.balancers.registry import BalancerRegistry
from userproxy.control.health import HealthState, rfc3339
from userproxy.control.proxier import Proxier
from userproxy.control.trackers import ChangeRecorder
from userproxy.metrics import Metrics
from userproxy.model import Node, Protocol, Service, ServicePort

SYNC_PERIOD = 30.0


def build(clock: FakeClock) -> tuple[ChangeRecorder, Proxier, HealthState]:
    recorder = ChangeRecorder("node-a", lambda: None, clock=clock.now, wall_clock=lambda: 5e8)
    proxier = Proxier(
        recorder, RecordingEffects(), BalancerRegistry(), clock=clock.now, wall_clock=lambda: 5e8
    )
    health = HealthState(recorder, proxier, SYNC_PERIOD, clock=clock.now, wall_clock=lambda: 5e8)
    recorder.on_services_synced()
    recorder.on_endpointslices_synced()
    return recorder, proxier, health


SERVICE = Service(
    "default", "web", cluster_ips=("10.0.0.1",), ports=(ServicePort("", Protocol.TCP, 80),)
)


@pytest.mark.parametrize(
    ("pending_for", "live"),
    [
        pytest.param(None, True, id="nothing-pending"),
        pytest.param(0.0, True, id="just-queued"),
        pytest.param(2 * SYNC_PERIOD, True, id="exactly-2x-sync-period"),
        pytest.param(2 * SYNC_PERIOD + 0.1, False, id="older-than-2x-sync-period"),
    ],
)
def test_live_while_no_change_waits_longer_than_twice_the_sync_period(
    pending_for: float | None, live: bool
) -> None:
    clock = FakeClock(1000.0)
    recorder, _, health = build(clock)
    if pending_for is not None:
        recorder.on_service_add(SERVICE)
        clock.advance(pending_for)
    report = health.report()
    assert report.live is live
    assert report.healthy is live


def test_a_sync_makes_it_live_again() -> None:
    clock = FakeClock(1000.0)
    recorder, proxier, health = build(clock)
    recorder.on_service_add(SERVICE)
    clock.advance(100)
    assert not health.report().live
    proxier.sync()
    report = health.report()
    assert report.live
    assert report.last_updated == 5e8


@pytest.mark.parametrize(
    ("node", "eligible"),
    [
        pytest.param(None, True, id="no-node-object"),
        pytest.param(Node("node-a"), True, id="plain-node"),
        pytest.param(Node("node-a", deleting=True), False, id="deletion-timestamp"),
        pytest.param(Node("node-a", to_be_deleted_taint=True), False, id="autoscaler-taint"),
    ],
)
def test_node_eligibility(node: Node | None, eligible: bool) -> None:
    clock = FakeClock(1000.0)
    recorder, proxier, health = build(clock)
    if node is not None:
        recorder.on_node_add(node)
    proxier.sync()
    report = health.report()
    assert report.live
    assert report.node_eligible is eligible
    assert report.healthy is eligible


def test_rfc3339() -> None:
    assert rfc3339(None) == "0001-01-01T00:00:00Z"
    assert rfc3339(0.5) == "1970-01-01T00:00:00.500000Z"


async def test_http_answers_and_counters() -> None:
    clock = FakeClock(1000.0)
    recorder, proxier, health = build(clock)
    metrics = Metrics()
    recorder.on_node_add(Node("node-a", to_be_deleted_taint=True))
    proxier.sync()
    async with TestClient(TestServer(health_app(health, metrics))) as client:
        livez = await client.get("/livez")
        assert livez.status == 200
        body = await livez.json()
        assert set(body) == {"lastUpdated", "currentTime"}
        healthz = await client.get("/healthz")
        assert healthz.status == 503
        assert (await healthz.json())["nodeEligible"] is False
        recorder.on_service_add(SERVICE)
        clock.advance(61)
        assert (await client.get("/livez")).status == 503
    sample = metrics.registry.get_sample_value
    assert sample("kubeproxy_proxy_livez_total", {"code": "200"}) == 1
    assert sample("kubeproxy_proxy_livez_total", {"code": "503"}) == 1
    assert sample("kubeproxy_proxy_healthz_total", {"code": "503"}) == 1
