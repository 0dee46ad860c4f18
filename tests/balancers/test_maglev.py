"""Maglev (Eisenbud et al., NSDI 2016): the lookup table's balance, its disruption when an
endpoint leaves or comes back (100 000 synthetic client IPs), stability across rebuilds and
orders, and ``exclude``.  The measured numbers are printed (``pytest -s``)."""

from __future__ import annotations

import time

import pytest

from userproxy.balancers.maglev import (
    DEFAULT_TABLE_SIZE,
    Maglev,
    _endpoint_hashes,
    build_table,
    client_hash,
)
from userproxy.model import Endpoint

CLIENTS = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(100_000)]


def pool(count: int) -> list[Endpoint]:
    return [Endpoint(f"10.3.{n // 250}.{n % 250 + 1}", 8080) for n in range(count)]


@pytest.mark.parametrize("count", [3, 10, 100])
def test_every_endpoint_owns_its_share_of_the_table(count: int) -> None:
    names = tuple(str(e) for e in pool(count))
    started = time.perf_counter()
    build_table.cache_clear()
    table = build_table(names)
    took = time.perf_counter() - started
    owned = [0] * count
    for index in table:
        owned[index] += 1
    share = DEFAULT_TABLE_SIZE / count
    print(f"N={count}: owns {min(owned)}..{max(owned)} slots (1/N = {share:.1f}); "
          f"build {took * 1000:.1f} ms")  # fmt: skip
    # The fill hands out slots in turns, so each owns M/N rounded up or down.
    assert max(owned) - min(owned) <= 1
    assert all(abs(n - share) / share < 0.03 for n in owned)


@pytest.mark.parametrize(("size", "count"), [(1009, 7), (DEFAULT_TABLE_SIZE, 3),
                                             (DEFAULT_TABLE_SIZE, 100)])  # fmt: skip
def test_the_table_matches_the_plain_algorithm(size: int, count: int) -> None:
    """The fast tail (sorted free-slot lists) gives exactly the paper's probe-only fill."""
    names = tuple(str(e) for e in pool(count))
    offsets, skips = [], []
    for name in names:
        first, second = _endpoint_hashes(name)
        offsets.append(first % size)
        skips.append(second % (size - 1) + 1)
    expected = [-1] * size
    nexts = [0] * len(names)
    filled = 0
    while filled < size:
        for i in range(len(names)):
            slot = (offsets[i] + nexts[i] * skips[i]) % size
            while expected[slot] >= 0:
                nexts[i] += 1
                slot = (offsets[i] + nexts[i] * skips[i]) % size
            expected[slot] = i
            nexts[i] += 1
            filled += 1
            if filled == size:
                break
    assert list(build_table(names, size)) == expected


def assignments(balancer: Maglev) -> list[Endpoint | None]:
    return [balancer.pick(ip) for ip in CLIENTS]


def moved(
    before: list[Endpoint | None], after: list[Endpoint | None], changed: Endpoint
) -> tuple[float, float]:
    """(fraction of clients that moved, fraction that moved between two endpoints that are
    in both pools, i.e. neither from nor to ``changed``)."""
    total = between = 0
    for old, new in zip(before, after, strict=True):
        if old != new:
            total += 1
            if changed not in (old, new):
                between += 1
    return total / len(before), between / len(before)


@pytest.mark.parametrize("leaving", [0, 4, 9])
def test_disruption_when_one_of_ten_leaves_and_comes_back(leaving: int) -> None:
    endpoints = pool(10)
    full = Maglev(endpoints)
    before = assignments(full)
    gone = endpoints[leaving]
    fewer = full.renew([e for e in endpoints if e != gone])
    assert isinstance(fewer, Maglev)
    after = assignments(fewer)
    assert gone not in after
    total, between = moved(before, after, gone)
    back = fewer.renew(endpoints)
    assert isinstance(back, Maglev)
    again = assignments(back)
    total_back, between_back = moved(after, again, gone)
    print(f"remove {gone}: {total:.2%} moved, {between:.3%} between staying endpoints; "
          f"add it back: {total_back:.2%} moved, {between_back:.3%} between staying")  # fmt: skip
    for fraction, stray in ((total, between), (total_back, between_back)):
        assert fraction <= 1 / 10 + 0.02
        assert stray <= 0.005
    assert again == before, "the same pool gives the same table"


def test_the_table_does_not_depend_on_the_order_of_the_pool() -> None:
    endpoints = pool(10)
    assert assignments(Maglev(endpoints))[:2000] == assignments(Maglev(endpoints[::-1]))[:2000]


def test_client_hash_is_stable_across_processes() -> None:
    # BLAKE2b, not hash(): the same value on every node and after a restart.
    assert client_hash("192.0.2.1") == 0x11288B28CEFA74C8
    assert client_hash("192.0.2.1") != client_hash("192.0.2.2")


def test_exclude_walks_on_deterministically() -> None:
    endpoints = pool(5)
    balancer = Maglev(endpoints)
    for ip in CLIENTS[:500]:
        first = balancer.pick(ip)
        assert first is not None
        second = balancer.pick(ip, {first})
        assert second is not None
        assert second != first
        assert balancer.pick(ip, {first}) == second, "a retry lands on the same endpoint"
        third = balancer.pick(ip, {first, second})
        assert third not in (first, second)
    everything = set(endpoints)
    assert balancer.pick(CLIENTS[0], everything) == balancer.pick(CLIENTS[0])


def test_empty_and_single_pools() -> None:
    assert Maglev([]).pick("192.0.2.1") is None
    assert Maglev([]).table is None
    only = pool(1)[0]
    single = Maglev([only])
    assert {single.pick(ip) for ip in CLIENTS[:100]} == {only}
    assert single.pick("192.0.2.1", {only}) == only


def test_clients_spread_over_the_endpoints() -> None:
    endpoints = pool(10)
    counts: dict[Endpoint | None, int] = {}
    for endpoint in assignments(Maglev(endpoints)):
        counts[endpoint] = counts.get(endpoint, 0) + 1
    assert set(counts) == set(endpoints)
    assert all(8_500 < n < 11_500 for n in counts.values()), counts
