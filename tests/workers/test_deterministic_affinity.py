"""ClientIP affinity with ``--workers`` above 1: the rendezvous hash of the client IP over
the pool's endpoints (``balancers/affinity.py``), table-driven against its promises: the
same in every process and every balancer, only an endpoint's own clients move when it
leaves, a joining endpoint takes about its share, a failed dial gives the next-ranked."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterator

import pytest

from userproxy.balancers.affinity import AffinityTable, ClientIPAffinity, rendezvous
from userproxy.balancers.randomized import RandomChoice
from userproxy.balancers.roundrobin import RoundRobin
from userproxy.model import Endpoint

ENDPOINTS = tuple(Endpoint(f"10.3.0.{n}", 8080) for n in range(1, 6))
CLIENTS = [f"192.0.2.{i}" for i in range(1, 255)] + [f"2001:db8::{i:x}" for i in range(1, 255)]


@pytest.fixture
def deterministic() -> Iterator[None]:
    ClientIPAffinity.deterministic = True
    try:
        yield
    finally:
        ClientIPAffinity.deterministic = False


def members(endpoints: tuple[Endpoint, ...]) -> dict[str, Endpoint]:
    return {str(e): e for e in endpoints}


def test_every_balancer_and_order_gives_the_same_endpoint(deterministic: None) -> None:
    shuffled = list(ENDPOINTS)
    random.Random(1).shuffle(shuffled)
    pools = [
        ClientIPAffinity(RoundRobin(ENDPOINTS), AffinityTable(10.0)),
        ClientIPAffinity(RandomChoice(tuple(shuffled), random.Random(2)), AffinityTable(10.0)),
    ]
    for client in CLIENTS:
        picks = {pool.pick(client) for pool in pools for _ in range(3)}
        assert picks == {rendezvous(client, members(ENDPOINTS))}


def test_the_pick_is_the_same_in_another_process() -> None:
    """blake2b, not Python's per-process salted ``hash``."""
    script = (
        "from userproxy.balancers.affinity import rendezvous\n"
        "from userproxy.model import Endpoint\n"
        "eps = {str(e): e for e in (Endpoint(f'10.3.0.{n}', 8080) for n in range(1, 6))}\n"
        "print(','.join(str(rendezvous(f'192.0.2.{i}', eps)) for i in range(1, 60)))\n"
    )
    here = ",".join(str(rendezvous(f"192.0.2.{i}", members(ENDPOINTS))) for i in range(1, 60))
    for seed in ("1", "2"):
        other = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout.strip()
        assert other == here


def test_only_the_clients_of_a_leaving_endpoint_move() -> None:
    before = {c: rendezvous(c, members(ENDPOINTS)) for c in CLIENTS}
    gone = ENDPOINTS[2]
    after = {c: rendezvous(c, members(ENDPOINTS[:2] + ENDPOINTS[3:])) for c in CLIENTS}
    for client in CLIENTS:
        if before[client] != gone:
            assert after[client] == before[client]
        else:
            assert after[client] != gone


def test_a_joining_endpoint_takes_about_its_share_and_nothing_else_moves() -> None:
    fewer = ENDPOINTS[:4]
    before = {c: rendezvous(c, members(fewer)) for c in CLIENTS}
    after = {c: rendezvous(c, members(ENDPOINTS)) for c in CLIENTS}
    moved = [c for c in CLIENTS if before[c] != after[c]]
    assert all(after[c] == ENDPOINTS[4] for c in moved)
    # 1/5 of 508 clients is about 102: the hash is even enough to be within a wide band.
    assert 50 < len(moved) < 160, len(moved)


def test_the_clients_spread_over_every_endpoint() -> None:
    counts = dict.fromkeys(ENDPOINTS, 0)
    for client in CLIENTS:
        picked = rendezvous(client, members(ENDPOINTS))
        assert picked is not None
        counts[picked] += 1
    assert all(50 < n < 160 for n in counts.values()), counts


def test_a_failed_dial_gives_the_next_ranked_endpoint(deterministic: None) -> None:
    pool = ClientIPAffinity(RoundRobin(ENDPOINTS), AffinityTable(10.0))
    client = CLIENTS[0]
    first = pool.pick(client)
    assert first is not None
    pool.failed(client, first)
    second = pool.pick(client, exclude={first})
    assert second is not None
    assert second != first
    assert second == rendezvous(client, {k: v for k, v in members(ENDPOINTS).items() if v != first})
    # Every pool of every worker computes the same fallback.
    other = ClientIPAffinity(RoundRobin(ENDPOINTS[::-1]), AffinityTable(10.0))
    assert other.pick(client, exclude={first}) == second
    # The pin is written (``/explain`` shows it).
    assert pool.table.pins[client][0] == str(second)


def test_nothing_left_is_none(deterministic: None) -> None:
    pool = ClientIPAffinity(RoundRobin(ENDPOINTS[:1]), AffinityTable(10.0))
    assert pool.pick(CLIENTS[0], exclude={ENDPOINTS[0]}) is None
