"""ClientIP affinity holds for the Service port, whichever of its addresses a client uses
(ClusterIP, NodePort, externalIP), as kube-proxy's per-endpoint recent lists do; pins to
an endpoint that left are dropped and the port's table goes with the port.

Over real sockets on both loops.  The balancer is ``random`` so that listeners with
tables of their own (per address) would disagree for most clients.  Every client comes
from the loopback, so NodePort and externalIP listeners serve it from their node pool
(the cluster-wide traffic class) and the ClusterIP listener from its only pool: the pin
crosses traffic classes too.

Addresses: 127.117.N.0/24 with N in 200..254 (``fresh_net`` never makes a third octet
above 199): Service 127.117.N.1, externalIP 127.117.N.2, backends 127.117.N.10+,
clients 127.117.N.100+; NodePorts on 127.0.0.1 at a free port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.backends import Backend, UdpBackend, ask, name_server
from tests.support.manifests import endpoint_slice, service, write
from tests.support.proxyrun import eventually, free_port, running_proxy
from userproxy.balancers.affinity import ClientIPAffinity
from userproxy.balancers.registry import BalancerRegistry
from userproxy.dataplane.deadlines import TcpTimeouts
from userproxy.dataplane.limits import ConnectionLimit
from userproxy.dataplane.listener_set import ListenerSet
from userproxy.model import (
    AddressKind,
    Endpoint,
    ListenerSpec,
    PoolSpec,
    Protocol,
    ServiceKey,
    ServicePortName,
)
from userproxy.proxy import Proxy

pytestmark = pytest.mark.both_loops

PORT = 8080
CLIENTS = 12
_nets = itertools.count(200 + (os.getpid() % 5) * 11)
Address = tuple[str, int]


class Scene:
    """A NodePort Service with an externalIP and ClientIP affinity, and its backends."""

    def __init__(self, tmp_path: Path, protocol: str = "TCP", count: int = 3) -> None:
        net = next(_nets)
        assert net <= 254, "this file ran out of its addresses"
        self.protocol = protocol
        self.cluster_ip = f"127.117.{net}.1"
        self.external_ip = f"127.117.{net}.2"
        self.node_port = free_udp_port() if protocol == "UDP" else free_port()
        self.clients = [f"127.117.{net}.{100 + i}" for i in range(CLIENTS)]
        self.spn = ServicePortName("default", "web", "p", Protocol(protocol))
        self.dir = tmp_path / "manifests"
        self.dir.mkdir()
        self.backends: list[Backend | UdpBackend] = [
            (
                UdpBackend(f"127.117.{net}.{10 + i}", tagger(f"b{i}"))
                if protocol == "UDP"
                else Backend(f"127.117.{net}.{10 + i}", name_server(f"b{i}"))
            )
            for i in range(count)
        ]

    @property
    def addresses(self) -> dict[str, Address]:
        return {
            "ClusterIP": (self.cluster_ip, PORT),
            "NodePort": ("127.0.0.1", self.node_port),
            "ExternalIP": (self.external_ip, PORT),
        }

    def publish(self, only: list[int] | None = None, *, with_service: bool = True) -> None:
        chosen = range(len(self.backends)) if only is None else only
        objects: list[dict[str, Any]] = []
        if with_service:
            svc = service(
                "web",
                self.cluster_ip,
                PORT,
                port_name="p",
                protocol=self.protocol,
                annotations={"userproxy.io/balancer": "random"},
                affinity_timeout=600,
            )
            svc["spec"]["type"] = "NodePort"
            svc["spec"]["ports"][0]["nodePort"] = self.node_port
            svc["spec"]["externalIPs"] = [self.external_ip]
            objects.append(svc)
        for i in chosen:
            backend = self.backends[i]
            eps = endpoint_slice(f"web-{i}", "web", backend.port, [backend.ip], port_name="p")
            eps["ports"][0]["protocol"] = self.protocol
            objects.append(eps)
        write(self.dir / "web.json", *objects)

    def close(self) -> None:
        for backend in self.backends:
            backend.stop()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def tagger(name: str) -> Callable[[bytes], bytes]:
    return lambda _data: name.encode()


def ask_tcp(address: Address, source: str) -> str:
    """One request on a new connection (a new pick) from ``source``."""
    return ask(address, source=source)


def ask_udp(address: Address, source: str) -> str:
    """One datagram from a new socket (a new session, so a new pick) bound to ``source``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(2.0)
        for _ in range(3):  # a lost datagram on a busy machine: ask again
            sock.sendto(b"q", address)
            try:
                return sock.recv(100).decode()
            except TimeoutError:
                continue
        return "timeout"


@pytest.fixture
def tcp(tmp_path: Path) -> Iterator[Scene]:
    scene = Scene(tmp_path)
    yield scene
    scene.close()


@pytest.fixture
def udp(tmp_path: Path) -> Iterator[Scene]:
    scene = Scene(tmp_path, "UDP")
    yield scene
    scene.close()


def run_proxy(scene: Scene) -> Any:
    return running_proxy(scene.dir, nodeport_addresses=("127.0.0.1/32",))


def rounds(scene: Scene, asker: Callable[[Address, str], str]) -> dict[str, list[tuple[str, str]]]:
    """Each client pins through a different address kind first, then goes round all of
    them three times: (address kind, backend) in order, per client."""
    kinds = list(scene.addresses)
    seen: dict[str, list[tuple[str, str]]] = {}
    for i, client in enumerate(scene.clients):
        order = kinds[i % 3 :] + kinds[: i % 3]
        seen[client] = [
            (kind, asker(scene.addresses[kind], client)) for _ in range(3) for kind in order
        ]
    return seen


def assert_one_backend_per_client(seen: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    pins = {}
    for client, answers in seen.items():
        assert len({backend for _, backend in answers}) == 1, (client, answers)
        pins[client] = answers[0][1]
    assert len(set(pins.values())) > 1, f"every client on one backend: {pins}"
    return pins


def table_size(proxy: Proxy, scene: Scene) -> int | None:
    table = proxy.registry.context.affinity.get(scene.spn)
    return None if table is None else len(table)


async def test_tcp_pin_holds_through_cluster_ip_node_port_and_external_ip(tcp: Scene) -> None:
    tcp.publish()
    async with run_proxy(tcp) as proxy:
        kinds = {listener.spec.kind for listener in proxy.listeners}
        assert {str(kind) for kind in kinds} == set(tcp.addresses), kinds
        seen = await asyncio.to_thread(rounds, tcp, ask_tcp)
        assert table_size(proxy, tcp) == CLIENTS, "one table for the port, a pin per client"
        assert len(proxy.registry.context.affinity) == 1
    assert_one_backend_per_client(seen)


async def test_udp_pin_holds_through_cluster_ip_node_port_and_external_ip(udp: Scene) -> None:
    udp.publish()
    async with run_proxy(udp) as proxy:
        seen = await asyncio.to_thread(rounds, udp, ask_udp)
        assert table_size(proxy, udp) == CLIENTS
    assert_one_backend_per_client(seen)


async def test_pins_to_a_departed_endpoint_drop_and_the_table_goes_with_the_port(
    tcp: Scene,
) -> None:
    tcp.publish()
    async with run_proxy(tcp) as proxy:
        cluster = tcp.addresses["ClusterIP"]
        pins = await asyncio.to_thread(
            lambda: {client: ask(cluster, source=client) for client in tcp.clients}
        )
        # Remove the backend most clients are pinned to; the others keep theirs.
        gone = max(set(pins.values()), key=list(pins.values()).count)
        moved = [c for c, backend in pins.items() if backend == gone]
        kept = [c for c, backend in pins.items() if backend != gone]
        syncs = proxy.proxier.status.syncs
        tcp.publish(only=[i for i in range(3) if f"b{i}" != gone])
        await eventually(
            lambda: proxy.proxier.status.syncs > syncs and table_size(proxy, tcp) == len(kept),
            within=5.0,
            what="the pins to the removed endpoint to be dropped",
        )

        def after() -> dict[str, list[tuple[str, str]]]:
            return rounds(tcp, ask_tcp)

        seen = await asyncio.to_thread(after)
        for client in kept:
            assert {backend for _, backend in seen[client]} == {pins[client]}, seen[client]
        for client in moved:
            backends = {backend for _, backend in seen[client]}
            assert len(backends) == 1, seen[client]
            assert gone not in backends
        assert table_size(proxy, tcp) == CLIENTS

        # The Service goes away: its port's table is forgotten.
        syncs = proxy.proxier.status.syncs
        tcp.publish(with_service=False)
        await eventually(
            lambda: proxy.proxier.status.syncs > syncs and not list(proxy.listeners),
            within=5.0,
            what="the Service's listeners to close",
        )
        assert table_size(proxy, tcp) is None
        assert len(proxy.registry.context.affinity) == 0


async def test_listener_set_shares_one_table_per_port_and_trims_it() -> None:
    """The listener set's pools of one port (every address kind, both traffic classes)
    share a table; a Local pool without the pinned endpoint picks its own and moves the
    pin; a renamed port gets a fresh table and the old one is forgotten."""
    net = next(_nets)
    a, b = Endpoint(f"127.117.{net}.10", 1), Endpoint(f"127.117.{net}.11", 1)
    local = Endpoint(f"127.117.{net}.12", 1, is_local=True)
    web = ServicePortName("default", "web", "p", Protocol.TCP)
    key = ServiceKey("default", "web")

    def specs(spn: ServicePortName) -> list[ListenerSpec]:
        cluster = PoolSpec((a, b, local), "random", 600)
        return [
            ListenerSpec(spn, AddressKind.CLUSTER_IP, f"127.117.{net}.1", PORT, cluster),
            ListenerSpec(
                spn,
                AddressKind.EXTERNAL_IP,
                f"127.117.{net}.2",
                PORT,
                PoolSpec((local,), "random", 600),  # externalTrafficPolicy: Local
                cluster,
            ),
        ]

    listeners = ListenerSet(BalancerRegistry(), ConnectionLimit(100), TcpTimeouts())
    tables = listeners.registry.context.affinity
    try:
        listeners.set_listeners(key, specs(web))
        cluster_ip, external = sorted(listeners, key=lambda listener: listener.spec.ip)
        assert external.node_pool is not None
        pools = [cluster_ip.pool, external.pool, external.node_pool]
        balancers = [pool.balancer for pool in pools]
        assert all(isinstance(b, ClientIPAffinity) for b in balancers)
        table = tables.get(web)
        assert table is not None
        assert all(isinstance(b, ClientIPAffinity) and b.table is table for b in balancers)

        client = f"127.117.{net}.100"
        pinned = cluster_ip.pool.balancer.pick(client, (local,))
        assert pinned in (a, b)
        assert external.node_pool.balancer.pick(client) == pinned
        assert external.pool.balancer.pick(client) == local, "a Local pool never goes remote"
        assert cluster_ip.pool.balancer.pick(client) == local, "the pin moved"

        # ``local`` leaves every pool: its pins go, other pins stay.
        other = f"127.117.{net}.101"
        cluster_ip.pool.balancer.pick(other, (local,))
        trimmed = [
            dataclasses.replace(
                s,
                pool=dataclasses.replace(s.pool, endpoints=(a, b)),
                node_pool=None if s.node_pool is None else PoolSpec((a, b), "random", 600),
            )
            for s in specs(web)
        ]
        listeners.set_listeners(key, trimmed)
        assert tables.get(web) is table
        assert table.get(client, table.clock()) is None
        assert table.get(other, table.clock()) is not None

        renamed = ServicePortName("default", "web", "q", Protocol.TCP)
        listeners.set_listeners(key, specs(renamed))
        assert tables.get(web) is None, "the old port's table is forgotten"
        fresh = tables.get(renamed)
        assert fresh is not None
        assert len(fresh) == 0
        for listener in listeners:
            for pool in (listener.pool, listener.node_pool):
                if pool is not None:
                    assert isinstance(pool.balancer, ClientIPAffinity)
                    assert pool.balancer.table is fresh
        listeners.set_listeners(key, [])
        assert len(tables) == 0
    finally:
        listeners.stop_accepting()
