"""The outlier detector's rules on a fake clock: when an endpoint is ejected, for how long,
how many may be out at once, what a success and a pool change do, and what the balancer is
told (Envoy's consecutive failures with base/max ejection time and max ejection percent)."""

from __future__ import annotations

import logging
import os
import random

import pytest
from prometheus_client.exposition import choose_encoder
from prometheus_client.parser import text_string_to_metric_families

from tests.support.clock import FakeClock
from userproxy.admin.metrics_scrape import port_text_now
from userproxy.balancers.affinity import ClientIPAffinity
from userproxy.balancers.registry import BalancerRegistry
from userproxy.balancers.roundrobin import RoundRobin
from userproxy.dataplane.deadlines import TcpTimeouts
from userproxy.dataplane.limits import ConnectionLimit
from userproxy.dataplane.listener_set import ListenerSet
from userproxy.dataplane.outliers import Excluding, OutlierDetector, OutlierSettings, union
from userproxy.dataplane.tcp_listener import TcpListener
from userproxy.model import (
    AddressKind,
    Endpoint,
    ListenerSpec,
    PoolSpec,
    Protocol,
    ServiceKey,
    ServicePortName,
)

NAME = "default/web:http/TCP"
SETTINGS = OutlierSettings(
    consecutive_failures=3, base_ejection=10.0, max_ejection=25.0, max_ejected_percent=50
)


def endpoints(count: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i + 1}", 8080) for i in range(count)]


def detector(
    count: int = 4, settings: OutlierSettings = SETTINGS
) -> tuple[OutlierDetector, FakeClock, list[Endpoint]]:
    clock = FakeClock(100.0)
    found = OutlierDetector(NAME, settings, clock.now)
    pool = endpoints(count)
    found.set_endpoints(pool)
    return found, clock, pool


def fail(found: OutlierDetector, endpoint: Endpoint, times: int) -> None:
    for _ in range(times):
        found.failure(endpoint)


def test_ejected_after_n_failures_in_a_row() -> None:
    found, _, pool = detector()
    fail(found, pool[0], 2)
    assert found.ejected == set()
    fail(found, pool[0], 1)
    assert found.ejected == {pool[0]}
    assert found.ejections == 1


def test_a_success_resets_the_count() -> None:
    found, _, pool = detector()
    fail(found, pool[0], 2)
    found.success(pool[0])
    fail(found, pool[0], 2)
    assert found.ejected == set()
    fail(found, pool[0], 1)
    assert found.ejected == {pool[0]}


def test_ejection_time_doubles_in_a_row_and_is_capped() -> None:
    found, clock, pool = detector()
    durations = []
    for _ in range(4):
        fail(found, pool[0], 3)
        (ejection,) = found.status()
        durations.append(ejection.duration)
        assert ejection.until == clock.now() + ejection.duration
        clock.advance(ejection.duration - 0.01)
        found.refresh()
        assert found.ejected == {pool[0]}, "back before its time"
        clock.advance(0.01)
        found.refresh()
        assert found.ejected == set()
    assert durations == [10.0, 20.0, 25.0, 25.0]


def test_a_success_after_the_return_ends_the_streak() -> None:
    found, clock, pool = detector()
    fail(found, pool[0], 3)
    clock.advance(10.0)
    found.refresh()
    found.success(pool[0])
    fail(found, pool[0], 3)
    assert found.status()[0].duration == 10.0  # base again, not twice


def test_failures_while_ejected_do_not_count() -> None:
    found, clock, pool = detector()
    fail(found, pool[0], 3)
    fail(found, pool[0], 10)  # dials begun before the ejection
    clock.advance(10.0)
    found.refresh()
    fail(found, pool[0], 2)
    assert found.ejected == set()  # back with a fresh count: N failures again


@pytest.mark.parametrize(
    ("count", "percent", "most"),
    [
        (1, 50, 0),  # the sole endpoint is never ejected
        (2, 50, 1),
        (3, 50, 1),
        (4, 50, 2),
        (10, 50, 5),
        (10, 10, 1),
        (3, 100, 2),  # never the last one
        (5, 1, 1),  # at least one (Envoy's rule)
    ],
)
def test_cap_on_the_ejected_fraction(count: int, percent: int, most: int) -> None:
    settings = OutlierSettings(3, 10.0, 25.0, percent)
    found, _, pool = detector(count, settings)
    assert found.max_ejected == most
    for endpoint in pool:
        fail(found, endpoint, 3)
    assert len(found.ejected) == most
    assert found.ejections == most


def test_a_return_makes_room_under_the_cap() -> None:
    found, clock, pool = detector(2)
    fail(found, pool[0], 3)
    fail(found, pool[1], 3)
    assert found.ejected == {pool[0]}
    clock.advance(10.0)
    fail(found, pool[1], 3)  # a new run of failures once there is room
    assert found.ejected == {pool[1]}


def test_leaving_the_pool_forgets_and_readiness_changes_keep_the_ejection() -> None:
    found, _, pool = detector()
    fail(found, pool[0], 3)
    fail(found, pool[1], 2)
    terminating = Endpoint(pool[0].ip, pool[0].port, ready=False, terminating=True)
    found.set_endpoints([terminating, *pool[2:]])
    assert found.ejected == {terminating}
    found.set_endpoints(pool)
    found.set_endpoints(pool[1:])
    assert found.ejected == set()
    fail(found, pool[1], 1)
    assert found.ejected == set(), "pool[1]'s earlier failures were forgotten"
    fail(found, Endpoint("10.9.9.9", 1), 5)  # not (or no longer) in the pool
    assert found.ejected == set()


def test_off_with_zero_failures() -> None:
    found, _, pool = detector(settings=OutlierSettings(consecutive_failures=0))
    fail(found, pool[0], 100)
    assert found.ejected == set()
    tried: list[Endpoint] = []
    assert found.excluding(tried) is tried


def test_the_balancer_avoids_ejected_endpoints_and_falls_back_to_all() -> None:
    found, _, pool = detector(3, OutlierSettings(3, 10.0, 25.0, 100))
    balancer = RoundRobin(pool, random.Random(1))
    tried: list[Endpoint] = []
    assert found.excluding(tried) is tried  # nothing ejected: no view built
    fail(found, pool[0], 3)
    exclude = found.excluding(tried)
    assert isinstance(exclude, Excluding)
    picks = {balancer.pick("10.1.1.1", exclude) for _ in range(30)}
    assert picks == {pool[1], pool[2]}
    tried.append(pool[1])  # the view reads ``tried`` live
    assert {balancer.pick("10.1.1.1", exclude) for _ in range(10)} == {pool[2]}
    fail(found, pool[1], 3)
    tried.append(pool[2])
    # Everything excluded: the balancer goes round all of them rather than give up.
    assert {balancer.pick("10.1.1.1", exclude) for _ in range(30)} == set(pool)


def test_affinity_moves_a_pinned_client_off_an_ejected_endpoint() -> None:
    found, clock, pool = detector(3)
    balancer = ClientIPAffinity(RoundRobin(pool, random.Random(2)), 100.0, clock.now)
    pinned = balancer.pick("10.1.1.1", found.excluding([]))
    assert pinned is not None
    fail(found, pinned, 3)
    moved = balancer.pick("10.1.1.1", found.excluding([]))
    assert moved is not None
    assert moved != pinned


def test_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="userproxy.dataplane.outliers")
    found, clock, pool = detector(2)
    fail(found, pool[0], 3)
    fail(found, pool[1], 7)  # held in by the cap: one line, not one per failure
    clock.advance(30.0)
    found.refresh()
    found.refresh()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        (
            "WARNING",
            f"{NAME}: endpoint 10.0.0.1:8080 ejected for 10s after 3 failed dials in a row "
            "(ejection 1 in a row; 1 of 2 endpoints out)",
        ),
        (
            "WARNING",
            f"{NAME}: endpoint 10.0.0.2:8080 failed 3 dials in a row but is not ejected: "
            "1 of 2 endpoints are already out (at most 50%, never the last one)",
        ),
        ("INFO", f"{NAME}: endpoint 10.0.0.1:8080 is back from ejection (ejected 1 time in a row)"),
    ]


def test_union_keeps_each_address_once() -> None:
    a, b, c = endpoints(3)
    local_a = Endpoint(a.ip, a.port, is_local=True)
    assert union([(a, b), (local_a, c)]) == [a, b, c]


# --- one detector per Service port in the listener set -------------------------------------


def _listener_spec(
    port: str, ip: str, endpoints: tuple[Endpoint, ...], local: tuple[Endpoint, ...] = ()
) -> ListenerSpec:
    spn = ServicePortName("shop", "web", port, Protocol.TCP)
    node_pool = PoolSpec(local, "round-robin") if local else None
    pool = PoolSpec(endpoints, "round-robin")
    return ListenerSpec(spn, AddressKind.CLUSTER_IP, ip, 8080, pool, node_pool)


async def test_listeners_of_a_service_port_share_one_detector() -> None:
    net = os.getpid() % 250
    first, second, other = (f"127.213.{net}.{200 + i}" for i in range(3))
    a, b, c = endpoints(3)
    listeners = ListenerSet(
        BalancerRegistry(), ConnectionLimit(10), TcpTimeouts(), outliers=SETTINGS
    )
    web = ServiceKey("shop", "web")
    http = ServicePortName("shop", "web", "http", Protocol.TCP)
    try:
        listeners.set_listeners(
            web,
            [
                _listener_spec("http", first, (a, b)),
                _listener_spec("http", second, (a,), local=(c,)),  # the node-local class
                _listener_spec("admin", other, (a, b)),
            ],
        )
        by_ip = {
            listener.spec.ip: listener
            for listener in listeners
            if isinstance(listener, TcpListener)
        }
        shared = listeners.outliers(http)
        assert shared is not None
        assert by_ip[first].outliers is shared
        assert by_ip[second].outliers is shared
        assert by_ip[other].outliers is not shared
        assert shared.max_ejected == 1  # 50 % of the union a, b, c
        fail(shared, c, 3)
        assert shared.ejected == {c}
        text = "".join(port_text_now(listeners, None, choose_encoder("")[0]))
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if "eject" in s.name
        }
        http_labels = (("protocol", "TCP"), ("service_port", "shop/web:http"))
        assert samples[("userproxy_endpoint_ejections_total", http_labels)] == 1
        assert samples[("userproxy_endpoints_ejected", http_labels)] == 1
        remaining = (
            "userproxy_endpoint_ejection_remaining_seconds",
            (("endpoint", "10.0.0.3:8080"), *http_labels),
        )
        assert 0 < samples[remaining] <= 10.0
        # c leaves both pools: forgotten; the Service goes: its count is kept.
        listeners.set_listeners(web, [_listener_spec("http", first, (a, b))])
        assert listeners.outliers(http) is shared
        assert shared.ejected == set()
        listeners.set_listeners(web, [])
        assert listeners.outliers(http) is None
        assert listeners.ejections() == {
            ("shop/web:http", "TCP"): (1, []),
            ("shop/web:admin", "TCP"): (0, []),  # counters never go away, as totals
        }
    finally:
        listeners.stop_accepting()
