"""ClientIP affinity per Service port: one ``AffinityTable`` shared by every pool of the
port (kube-proxy's per-endpoint "recent" lists, which the ClusterIP, NodePort, externalIP
and load-balancer chains all check; see ``userproxy.balancers.affinity``)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import pytest

from tests.support.clock import FakeClock
from userproxy.balancers.affinity import AffinityTable, AffinityTables, ClientIPAffinity
from userproxy.balancers.randomized import RandomChoice
from userproxy.balancers.registry import BalancerRegistry
from userproxy.balancers.roundrobin import RoundRobin
from userproxy.dataplane.pool import BackendPool
from userproxy.model import (
    AddressKind,
    Endpoint,
    ListenerSpec,
    PoolSpec,
    Protocol,
    ServiceKey,
    ServicePortName,
)


def ep(n: int, *, local: bool = False) -> Endpoint:
    return Endpoint(f"10.2.0.{n}", 8080, is_local=local)


A, B = ep(1), ep(2)
L = ep(3, local=True)  # the one endpoint on this node
ALL = (A, B, L)
CLIENTS = [f"192.0.2.{i}" for i in range(1, 13)]
WEB = ServicePortName("default", "web", "http", Protocol.TCP)
WEB_DNS = ServicePortName("default", "web", "dns", Protocol.UDP)
OTHER = ServicePortName("default", "other", "http", Protocol.TCP)
SERVICE = ServiceKey("default", "web")


def shared(
    *pools: Sequence[Endpoint], timeout: float = 10.0
) -> tuple[list[ClientIPAffinity], AffinityTable, FakeClock]:
    """Wrappers over random choice (so pools disagree unless the table decides), one table."""
    clock = FakeClock()
    table = AffinityTable(timeout, clock.now)
    wrappers = [
        ClientIPAffinity(RandomChoice(pool, random.Random(i)), table)
        for i, pool in enumerate(pools)
    ]
    return wrappers, table, clock


def test_a_pin_made_by_one_pool_holds_in_every_pool_of_the_port() -> None:
    """ClusterIP pool pins, the NodePort and externalIP pools (same endpoints) follow."""
    (cluster, node_port, external), table, _ = shared(ALL, ALL, ALL)
    pins = {client: cluster.pick(client) for client in CLIENTS}
    assert len(set(pins.values())) > 1, "clients spread"
    for _ in range(5):
        for client, pinned in pins.items():
            assert node_port.pick(client) == pinned
            assert external.pick(client) == pinned
            assert cluster.pick(client) == pinned
    assert len(table) == len(CLIENTS)


def test_the_timer_restarts_whichever_pool_the_client_comes_through() -> None:
    (cluster, node_port), _, clock = shared(ALL, ALL, timeout=10.0)
    pinned = cluster.pick("192.0.2.1")
    for step in range(1, 21):
        clock.set(step * 6.0)  # each pick within the timeout of the previous one
        pool = node_port if step % 2 else cluster
        assert pool.pick("192.0.2.1") == pinned


@pytest.mark.parametrize("expired_at", [10.0, 25.0], ids=["exactly-timeout", "later"])
def test_expiry_is_the_same_for_every_pool(expired_at: float) -> None:
    (cluster, node_port), table, clock = shared(ALL, ALL, timeout=10.0)
    for client in CLIENTS:
        cluster.pick(client)
    clock.set(9.999)
    assert len(table) == len(CLIENTS)
    assert all(table.get(client, clock.now()) is not None for client in CLIENTS)
    clock.set(expired_at)  # 10 s after the last connection: expired, as --seconds 10
    assert all(table.get(client, clock.now()) is None for client in CLIENTS)
    assert len(table) == 0, "an expired pin met by a lookup is dropped"
    repicked = {client: node_port.pick(client) for client in CLIENTS}
    assert all(cluster.pick(client) == repicked[client] for client in CLIENTS)


def test_a_pool_without_the_pinned_endpoint_picks_anew_and_moves_the_pin() -> None:
    """A Local pool (only L) never sends a client to a remote endpoint it is pinned to
    (kube-proxy writes an endpoint's --rcheck only into chains listing it); the pin then
    moves to what the Local pool picked, for every pool (one pin per client)."""
    (cluster, local), table, _ = shared(ALL, (L,))
    remote = {}
    for client in CLIENTS:
        picked = cluster.pick(client)
        while picked == L:  # pin every client to a remote endpoint first
            table.forget(client, str(L))
            picked = cluster.pick(client, (L,))
        remote[client] = picked
    assert set(remote.values()) <= {A, B}
    for client in CLIENTS:
        assert local.pick(client) == L
    for client in CLIENTS:
        assert cluster.pick(client) == L, "the pin moved to the endpoint used last"
    assert len(table) == len(CLIENTS)


def test_a_pool_without_the_pinned_endpoint_leaves_pins_of_others_alone() -> None:
    (cluster, local), table, _ = shared(ALL, (L,))
    pins = {client: cluster.pick(client) for client in CLIENTS}
    local.pick(CLIENTS[0])
    for client in CLIENTS[1:]:
        assert cluster.pick(client) == pins[client]
    assert len(table) == len(CLIENTS)


def test_renew_of_one_pool_keeps_pins_to_endpoints_of_other_pools() -> None:
    """A Local pool losing its endpoints must not unpin clients of the cluster-wide pool:
    only the owner of the table (the listener set) knows the union of the pools."""
    (cluster, local), table, _ = shared(ALL, (L,))
    pins = {client: cluster.pick(client) for client in CLIENTS}
    renewed = local.renew(())
    assert renewed.pick(CLIENTS[0]) is None
    assert len(table) == len(CLIENTS)
    for client, pinned in pins.items():
        assert cluster.pick(client) == pinned


def test_failed_dial_in_one_pool_unpins_for_all() -> None:
    (cluster, node_port), table, _ = shared(ALL, ALL)
    pinned = cluster.pick("192.0.2.1")
    assert pinned is not None
    node_port.failed("192.0.2.1", pinned)
    assert len(table) == 0
    retry = node_port.pick("192.0.2.1", {pinned})
    assert retry not in (None, pinned)
    assert cluster.pick("192.0.2.1") == retry, "re-pinned where the retry went"


def test_a_condition_change_keeps_the_pin() -> None:
    """Pins name the endpoint's address, as KUBE-SEP chains do: an endpoint turning
    terminating (still serving) keeps its clients in a pool that still lists it."""
    (cluster,), _, _ = shared((A, B))
    pins = {client: cluster.pick(client) for client in CLIENTS}
    terminating = dataclasses.replace(A, ready=False, terminating=True)
    renewed = cluster.renew((terminating, B))
    for client, pinned in pins.items():
        assert renewed.pick(client) == (terminating if pinned == A else B)


def test_timeout_changed_in_place_judges_existing_pins() -> None:
    (cluster,), table, clock = shared(ALL, timeout=100.0)
    pinned = cluster.pick("192.0.2.1")
    clock.set(50.0)
    assert cluster.pick("192.0.2.1") == pinned
    table.timeout = 20.0
    clock.set(69.0)
    assert table.get("192.0.2.1", clock.now()) is not None
    clock.set(70.0)
    assert table.get("192.0.2.1", clock.now()) is None


def test_the_shared_table_is_swept_by_picks_of_any_pool() -> None:
    (cluster, node_port), table, clock = shared(ALL, ALL, timeout=10.0)
    for i in range(1000):
        cluster.pick(f"old-{i}")
    clock.set(20.0)
    for i in range(30):
        node_port.pick(f"new-{i}")
    assert len(table) == 30, "the 1024th lookup, in another pool, swept the expired pins"


# -- AffinityTables: per Service port, trimmed by the listener set ---------------------------


def spec(
    spn: ServicePortName,
    ip: str,
    pool: Sequence[Endpoint],
    node_pool: Sequence[Endpoint] | None = None,
    *,
    affinity: int | None = 60,
    kind: AddressKind = AddressKind.CLUSTER_IP,
) -> ListenerSpec:
    return ListenerSpec(
        spn,
        kind,
        ip,
        80,
        PoolSpec(tuple(pool), "random", affinity),
        None if node_pool is None else PoolSpec(tuple(node_pool), "random", affinity),
    )


def pinned_tables(clock: FakeClock) -> tuple[AffinityTables, AffinityTable, AffinityTable]:
    tables = AffinityTables(clock.now)
    web = tables.table(WEB, 60)
    dns = tables.table(WEB_DNS, 60)
    for table in (web, dns):
        for i, client in enumerate(CLIENTS):
            endpoint = ALL[i % 3]
            table.pin(client, str(endpoint), clock.now())
    return tables, web, dns


def test_tables_are_per_service_port() -> None:
    tables = AffinityTables()
    web = tables.table(WEB, 60)
    assert tables.table(WEB, 60) is web, "every pool of the port gets the same table"
    assert tables.table(WEB_DNS, 60) is not web, "another port (or protocol) has its own"
    assert tables.table(OTHER, 60) is not web
    assert tables.get(WEB) is web
    assert len(tables) == 3


def test_sync_drops_pins_to_endpoints_that_left_every_pool() -> None:
    """An endpoint only in a node pool (NodePort, Local external pool) stays pinned; one
    that left every pool of the port is unpinned."""
    clock = FakeClock()
    tables, web, dns = pinned_tables(clock)
    tables.sync(
        SERVICE,
        [
            spec(WEB, "10.96.0.1", (A, B)),
            spec(WEB, "198.51.100.1", (L,), (A, B, L), kind=AddressKind.EXTERNAL_IP),
            spec(WEB_DNS, "10.96.0.1", (A,)),
        ],
    )
    assert len(web) == len(CLIENTS), "L is still in the externalIP listener's pools"
    assert len(dns) == len(CLIENTS) // 3, "only the pins to A are left on the dns port"
    tables.sync(SERVICE, [spec(WEB, "10.96.0.1", (A,)), spec(WEB_DNS, "10.96.0.1", (A,))])
    assert len(web) == len(CLIENTS) // 3


def test_sync_drops_expired_pins() -> None:
    clock = FakeClock()
    tables, web, _ = pinned_tables(clock)
    clock.set(60.0)
    tables.sync(SERVICE, [spec(WEB, "10.96.0.1", ALL), spec(WEB_DNS, "10.96.0.1", ALL)])
    assert len(web) == 0


@pytest.mark.parametrize(
    "kept",
    [
        [],
        [spec(WEB, "10.96.0.1", ALL)],
        [spec(WEB, "10.96.0.1", ALL), spec(WEB_DNS, "10.96.0.1", ALL, affinity=None)],
    ],
    ids=["service-gone", "dns-port-gone", "dns-port-lost-affinity"],
)
def test_sync_forgets_the_tables_of_ports_that_went_away(kept: list[ListenerSpec]) -> None:
    clock = FakeClock()
    tables, web, _ = pinned_tables(clock)
    other = tables.table(OTHER, 60)
    tables.sync(SERVICE, kept)
    assert tables.get(WEB_DNS) is None
    assert tables.get(WEB) is (web if kept else None)
    assert len(tables) == (2 if kept else 1)
    assert tables.get(OTHER) is other, "another Service's table is untouched"
    again = tables.table(WEB_DNS, 60)
    assert len(again) == 0, "a port that comes back starts without pins"


# -- the pools: shared through the registry's context -------------------------------------------


def affinity_of(pool: BackendPool) -> ClientIPAffinity:
    assert isinstance(pool.balancer, ClientIPAffinity)
    return pool.balancer


def test_pools_of_one_port_share_the_registry_table() -> None:
    registry = BalancerRegistry()
    cluster = BackendPool(PoolSpec(ALL, "random", 60), registry, WEB)
    external = BackendPool(PoolSpec((L,), "random", 60), registry, WEB)
    node = BackendPool(PoolSpec(ALL, "round-robin", 60), registry, WEB)
    other = BackendPool(PoolSpec(ALL, "random", 60), registry, OTHER)
    table = registry.context.affinity.get(WEB)
    assert table is not None
    assert affinity_of(cluster).table is table
    assert affinity_of(external).table is table
    assert affinity_of(node).table is table
    assert affinity_of(other).table is not table
    pins = {client: cluster.balancer.pick(client) for client in CLIENTS}
    for client, pinned in pins.items():
        assert node.balancer.pick(client) == pinned, "another balancer kind follows the pin"


def test_pool_update_keeps_the_shared_table() -> None:
    registry = BalancerRegistry()
    pool = BackendPool(PoolSpec(ALL, "random", 60), registry, WEB)
    table = affinity_of(pool).table
    pool.update(PoolSpec((A, B), "random", 60))
    assert affinity_of(pool).table is table
    pool.update(PoolSpec((A, B), "round-robin", 120))
    assert affinity_of(pool).table is table
    assert table.timeout == 120
    assert isinstance(affinity_of(pool).inner, RoundRobin)
    pool.update(PoolSpec((A, B), "round-robin", None))
    assert not isinstance(pool.balancer, ClientIPAffinity)


def test_pool_of_a_renamed_port_moves_to_that_ports_table() -> None:
    registry = BalancerRegistry()
    spec = PoolSpec(ALL, "random", 60)
    pool = BackendPool(spec, registry, WEB)
    pool.balancer.pick(CLIENTS[0])
    pool.update(spec, WEB)
    assert affinity_of(pool).table is registry.context.affinity.get(WEB), "same port: kept"
    pool.update(spec, OTHER)
    table = registry.context.affinity.get(OTHER)
    assert table is not None
    assert affinity_of(pool).table is table
    assert len(table) == 0, "the old name's pins are not this port's"
