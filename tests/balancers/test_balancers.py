"""Balancers, ClientIP affinity, the registry, the backend pool and the data-plane limits
(kube-proxy rules: "Session affinity"; the Balancer protocol in ``userproxy.balancers.base``)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence

import pytest

from tests.support.clock import FakeClock
from userproxy.balancers.affinity import ClientIPAffinity
from userproxy.balancers.base import Balancer
from userproxy.balancers.randomized import RandomChoice
from userproxy.balancers.registry import DEFAULT_BALANCER, BalancerRegistry
from userproxy.balancers.roundrobin import RoundRobin
from userproxy.dataplane.limits import ConnectionLimit, share_of
from userproxy.dataplane.pool import BackendPool
from userproxy.logs import RateLimitedLog
from userproxy.model import Endpoint, PoolSpec


def ep(n: int) -> Endpoint:
    return Endpoint(f"10.1.0.{n}", 8080)


A, B, C, D = ep(1), ep(2), ep(3), ep(4)
POOL3 = (A, B, C)


def round_robin(endpoints: Sequence[Endpoint]) -> Balancer:
    return RoundRobin(endpoints, random.Random(7))


def random_choice(endpoints: Sequence[Endpoint]) -> Balancer:
    return RandomChoice(endpoints, random.Random(7))


KINDS: list[tuple[str, Callable[[Sequence[Endpoint]], Balancer], type]] = [
    ("round-robin", round_robin, RoundRobin),
    ("random", random_choice, RandomChoice),
]
KIND_IDS = [kind[0] for kind in KINDS]
FACTORIES = [pytest.param(factory, id=name) for name, factory, _ in KINDS]

# -- round-robin ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 5], ids=lambda n: f"pool-{n}")
def test_round_robin_is_exactly_even(size: int) -> None:
    pool = [ep(n) for n in range(1, size + 1)]
    balancer = RoundRobin(pool)
    counts = Counter(balancer.pick("192.0.2.1") for _ in range(10 * size))
    assert counts == dict.fromkeys(pool, 10)


def test_round_robin_cycles_in_a_fixed_order() -> None:
    balancer = RoundRobin(POOL3)
    first = [balancer.pick("c") for _ in range(3)]
    assert sorted(first, key=str) == list(POOL3)
    assert [balancer.pick("c") for _ in range(6)] == first * 2


@pytest.mark.parametrize(
    "exclude",
    [{A}, {B}, {A, C}, {B, C}],
    ids=["not-a", "not-b", "only-b", "only-a"],
)
def test_round_robin_exclude_skips(exclude: set[Endpoint]) -> None:
    balancer = RoundRobin(POOL3)
    allowed = set(POOL3) - exclude
    picks = [balancer.pick("c", exclude) for _ in range(12)]
    assert set(picks) == allowed
    counts = Counter(picks)
    assert max(counts.values()) - min(counts.values()) <= 1, "still spread over the rest"


@pytest.mark.parametrize("factory", FACTORIES)
def test_all_excluded_still_returns_one(
    factory: Callable[[Sequence[Endpoint]], Balancer],
) -> None:
    balancer = factory(POOL3)
    picks = {balancer.pick("c", set(POOL3)) for _ in range(9)}
    assert picks <= set(POOL3)
    assert None not in picks


def test_round_robin_all_excluded_goes_round() -> None:
    balancer = RoundRobin(POOL3)
    picks = [balancer.pick("c", set(POOL3)) for _ in range(6)]
    assert set(picks) == set(POOL3), "a retry ladder walks the whole pool again"


@pytest.mark.parametrize("factory", FACTORIES)
def test_empty_pool_picks_none(factory: Callable[[Sequence[Endpoint]], Balancer]) -> None:
    balancer = factory(())
    assert balancer.pick("c") is None
    assert balancer.pick("c", {A}) is None
    assert ClientIPAffinity(balancer, 10.0).pick("c") is None


@pytest.mark.parametrize(("name", "factory", "kind"), KINDS, ids=KIND_IDS)
def test_renew_keeps_the_kind(
    name: str, factory: Callable[[Sequence[Endpoint]], Balancer], kind: type
) -> None:
    renewed = factory(POOL3).renew((C, D))
    assert isinstance(renewed, kind)
    assert sorted(renewed.endpoints, key=str) == [C, D]
    assert {renewed.pick("c") for _ in range(40)} == {C, D}
    wrapped = ClientIPAffinity(factory(POOL3), 10.0).renew((D,))
    assert isinstance(wrapped, ClientIPAffinity)
    assert wrapped.timeout == 10.0
    assert wrapped.pick("c") == D


# -- random -----------------------------------------------------------------------------------


def test_random_returns_only_pool_members() -> None:
    balancer = RandomChoice(POOL3, random.Random(1))
    picks = Counter(balancer.pick(f"192.0.2.{i % 7}") for i in range(300))
    assert set(picks) == set(POOL3), "every member is reachable, nothing else"


@pytest.mark.parametrize("exclude", [{A}, {B, C}, {A, B}], ids=["not-a", "only-a", "only-c"])
def test_random_respects_exclude(exclude: set[Endpoint]) -> None:
    balancer = RandomChoice(POOL3, random.Random(2))
    picks = {balancer.pick("c", exclude) for _ in range(100)}
    assert picks == set(POOL3) - exclude


# -- ClientIP affinity ----------------------------------------------------------------------


def sticky(
    endpoints: Sequence[Endpoint] = (A, B), timeout: float = 10.0
) -> tuple[ClientIPAffinity, FakeClock]:
    """Affinity over round-robin: each fresh pick moves to the next endpoint."""
    time = FakeClock()
    return ClientIPAffinity(RoundRobin(endpoints, random.Random(0)), timeout, time.now), time


def test_affinity_sticks_per_client_ip() -> None:
    balancer, time = sticky(POOL3)
    first = {ip: balancer.pick(ip) for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3")}
    assert set(first.values()) == set(POOL3), "different clients spread over the pool"
    for step in range(20):
        time.set(step * 0.5)
        for ip, pinned in first.items():
            assert balancer.pick(ip) == pinned
    assert len(balancer) == 3


def test_affinity_timeout_expiry_repicks() -> None:
    balancer, time = sticky((A, B), timeout=10.0)
    pinned = balancer.pick("192.0.2.1")
    time.set(9.999)
    assert balancer.pick("192.0.2.1") == pinned
    time.set(9.999 + 10.0)  # exactly the deadline: expired
    repicked = balancer.pick("192.0.2.1")
    assert repicked is not None
    assert repicked != pinned, "round-robin moved on: the client was re-picked"
    time.advance(5.0)
    assert balancer.pick("192.0.2.1") == repicked, "and pinned again"


def test_affinity_timer_restarts_on_every_pick() -> None:
    balancer, time = sticky((A, B), timeout=10.0)
    pinned = balancer.pick("192.0.2.1")
    for step in range(1, 21):
        time.set(step * 5.0)  # every timeout/2, 100 s in all
        assert balancer.pick("192.0.2.1") == pinned


def test_affinity_entry_dropped_when_endpoint_leaves_on_renew() -> None:
    balancer, _ = sticky((A, B), timeout=100.0)
    pins = {f"192.0.2.{i}": balancer.pick(f"192.0.2.{i}") for i in range(1, 7)}
    assert Counter(pins.values()) == {A: 3, B: 3}
    renewed = balancer.renew((B, C))
    assert isinstance(renewed, ClientIPAffinity)
    assert len(renewed) == 3, "the three clients pinned to A are forgotten"
    assert len(balancer) == 3, "old and new wrapper share the pool's one table"
    for ip, pinned in pins.items():
        if pinned == B:
            assert renewed.pick(ip) == B
        else:
            assert renewed.pick(ip) in (B, C)


def test_affinity_failed_forgets_the_pin_and_repins() -> None:
    balancer, _ = sticky((A, B))
    pinned = balancer.pick("192.0.2.1")
    assert pinned is not None
    balancer.failed("192.0.2.1", pinned)
    assert len(balancer) == 0
    again = balancer.pick("192.0.2.1")
    assert again is not None
    assert again != pinned, "the next pick re-pins (round-robin moved on)"
    assert balancer.pick("192.0.2.1") == again


def test_affinity_failed_with_exclude_goes_elsewhere() -> None:
    balancer, _ = sticky(POOL3)
    pinned = balancer.pick("192.0.2.1")
    assert pinned is not None
    balancer.failed("192.0.2.1", pinned)
    retry = balancer.pick("192.0.2.1", {pinned})
    assert retry not in (pinned, None)
    assert len(balancer) == 1, "the retry re-pinned the client"
    for _ in range(5):
        assert balancer.pick("192.0.2.1") == retry


def test_affinity_exclude_overrides_a_live_pin() -> None:
    balancer, _ = sticky(POOL3)
    pinned = balancer.pick("192.0.2.1")
    assert pinned is not None
    other = balancer.pick("192.0.2.1", {pinned})
    assert other not in (pinned, None)
    assert balancer.pick("192.0.2.1") == other, "re-pinned to where the retry went"


def test_affinity_failed_for_another_endpoint_keeps_the_pin() -> None:
    balancer, _ = sticky(POOL3)
    pinned = balancer.pick("192.0.2.1")
    other = next(e for e in POOL3 if e != pinned)
    balancer.failed("192.0.2.1", other)
    balancer.failed("192.0.2.99", other)
    assert len(balancer) == 1
    assert balancer.pick("192.0.2.1") == pinned


def test_affinity_sweep_bounds_the_table() -> None:
    balancer, time = sticky(POOL3, timeout=10.0)
    for i in range(1000):
        balancer.pick(f"old-{i}")
    assert len(balancer) == 1000
    time.set(20.0)  # every entry has expired
    for i in range(23):
        balancer.pick(f"new-{i}")
    assert len(balancer) == 1023, "no sweep before the 1024th pick"
    for i in range(23, 30):
        balancer.pick(f"new-{i}")
    assert len(balancer) == 30, "the 1024th pick swept the 1000 expired entries"


def test_affinity_table_bounded_across_pool_changes() -> None:
    """Expired entries must not survive forever when the pool changes often.

    Each round lets every entry expire, brings 500 new clients, then changes the pool (a
    rolling update: endpoint D comes and goes, A/B/C stay). Whatever the sweep period, a
    table of clients that never come back must stay near the number of live clients.
    """
    balancer: Balancer
    balancer, time = sticky(POOL3, timeout=10.0)
    for round_ in range(10):
        time.advance(20.0)
        for i in range(500):
            balancer.pick(f"198.51.{round_}.{i}")
        balancer = balancer.renew((*POOL3, D) if round_ % 2 == 0 else POOL3)
    assert isinstance(balancer, ClientIPAffinity)
    assert len(balancer) <= 1024 + 500, f"{len(balancer)} entries, most of them expired"


# -- the registry -----------------------------------------------------------------------------


def test_registry_names() -> None:
    names = BalancerRegistry().names
    assert {"round-robin", "random"} <= set(names)
    assert names == sorted(names)
    assert DEFAULT_BALANCER == "round-robin"


@pytest.mark.parametrize(
    ("name", "resolved"),
    [(None, "round-robin"), ("round-robin", "round-robin"), ("random", "random")],
    ids=["none-is-default", "round-robin", "random"],
)
def test_registry_resolves_known_names(
    name: str | None, resolved: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    assert BalancerRegistry().resolve(name, "ns/svc") == resolved
    assert caplog.records == []


def test_registry_unknown_name_warns_once_per_owner_and_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="userproxy.balancers.registry")
    registry = BalancerRegistry()
    for _ in range(3):
        assert registry.resolve("fastest", "ns/a") == DEFAULT_BALANCER
    assert len(caplog.records) == 1
    assert "fastest" in caplog.records[0].getMessage()
    assert "ns/a" in caplog.records[0].getMessage()
    registry.resolve("fastest", "ns/b")
    registry.resolve("slowest", "ns/a")
    registry.resolve("fastest", "ns/b")
    assert len(caplog.records) == 3


def test_registry_extra_factories() -> None:
    registry = BalancerRegistry({"first": lambda eps, _context: RoundRobin(eps[:1])})
    assert "first" in registry.names
    assert registry.resolve("first") == "first"
    assert registry.build("first", POOL3, None).endpoints == (A,)


@pytest.mark.parametrize(("name", "factory", "kind"), KINDS, ids=KIND_IDS)
def test_registry_build(
    name: str, factory: Callable[[Sequence[Endpoint]], Balancer], kind: type
) -> None:
    registry = BalancerRegistry()
    plain = registry.build(name, POOL3, None)
    assert isinstance(plain, kind)
    wrapped = registry.build(name, POOL3, 300)
    assert isinstance(wrapped, ClientIPAffinity)
    assert wrapped.timeout == 300
    assert sorted(wrapped.endpoints, key=str) == list(POOL3)


# -- the backend pool -------------------------------------------------------------------------


def affinity_of(pool: BackendPool) -> ClientIPAffinity:
    assert isinstance(pool.balancer, ClientIPAffinity)
    return pool.balancer


def test_pool_update_with_same_balancer_keeps_pins() -> None:
    pool = BackendPool(PoolSpec(POOL3, "round-robin", 3600), BalancerRegistry())
    pins = {f"192.0.2.{i}": pool.balancer.pick(f"192.0.2.{i}") for i in range(9)}
    assert set(pins.values()) == set(POOL3)
    pool.update(PoolSpec((A, B, D), "round-robin", 3600))
    assert len(affinity_of(pool)) == 6, "the pins to C are dropped, the others kept"
    for ip, pinned in pins.items():
        picked = pool.balancer.pick(ip)
        if pinned != C:
            assert picked == pinned
        else:
            assert picked in (A, B, D)


def test_pool_update_with_same_spec_keeps_the_balancer() -> None:
    spec = PoolSpec(POOL3, "round-robin", 60)
    pool = BackendPool(spec, BalancerRegistry())
    before = pool.balancer
    pool.update(PoolSpec(POOL3, "round-robin", 60))
    assert pool.balancer is before


@pytest.mark.parametrize(
    "new",
    [PoolSpec(POOL3, "random", 3600), PoolSpec(POOL3, "round-robin", 60)],
    ids=["other-balancer", "other-timeout"],
)
def test_pool_switching_balancer_or_timeout_keeps_pins(new: PoolSpec) -> None:
    """kube-proxy's recent lists outlive a rule rewrite (a new ``--seconds``), so pins
    survive a change of balancer or timeout; the new timeout judges them."""
    pool = BackendPool(PoolSpec(POOL3, "round-robin", 3600), BalancerRegistry())
    pinned = pool.balancer.pick("192.0.2.1")
    pool.update(new)
    assert pool.spec == new
    assert len(affinity_of(pool)) == 1, "the pin is kept"
    assert affinity_of(pool).timeout == new.affinity_timeout
    assert pool.balancer.pick("192.0.2.1") == pinned


@pytest.mark.parametrize(
    ("old", "new", "kind"),
    [("round-robin", "random", RandomChoice), ("random", "round-robin", RoundRobin)],
    ids=["to-random", "to-round-robin"],
)
def test_pool_switching_balancer_kind(old: str, new: str, kind: type) -> None:
    pool = BackendPool(PoolSpec(POOL3, old), BalancerRegistry())
    pool.update(PoolSpec((A, B), new))
    assert isinstance(pool.balancer, kind)
    assert sorted(pool.balancer.endpoints, key=str) == [A, B]


def test_pool_empty() -> None:
    pool = BackendPool(PoolSpec((), "round-robin"), BalancerRegistry())
    steps: list[tuple[tuple[Endpoint, ...], bool]] = [((), True), ((A,), False), ((), True)]
    for endpoints, empty in steps:
        pool.update(PoolSpec(endpoints, "round-robin"))
        assert pool.empty is empty
        assert pool.balancer.pick("c") == (None if empty else A)


# -- ConnectionLimit ----------------------------------------------------------------------------


class Events:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def pause(self) -> None:
        self.seen.append("pause")

    def resume(self) -> None:
        self.seen.append("resume")


@pytest.mark.parametrize(
    ("ops", "expected"),
    [
        ("aa", []),
        ("aaa", ["pause"]),
        ("aaaa", ["pause"]),
        ("aaar", ["pause", "resume"]),
        ("aaaar", ["pause"]),
        ("aaaarr", ["pause", "resume"]),
        ("aaarrr", ["pause", "resume"]),
        ("aaarar", ["pause", "resume", "pause", "resume"]),
        ("aarraaa", ["pause"]),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_connection_limit_pauses_and_resumes_at_the_boundary(ops: str, expected: list[str]) -> None:
    limit = ConnectionLimit(3)
    events = Events()
    limit.register("listener", events.pause, events.resume)
    for op in ops:
        if op == "a":
            limit.acquire()
        else:
            limit.release()
    assert events.seen == expected
    assert limit.active == ops.count("a") - ops.count("r")
    assert limit.full == (limit.active >= 3)


def test_connection_limit_calls_every_registered_listener() -> None:
    limit = ConnectionLimit(1)
    first, second = Events(), Events()
    limit.register("one", first.pause, first.resume)
    limit.register("two", second.pause, second.resume)
    limit.acquire()
    limit.release()
    assert first.seen == second.seen == ["pause", "resume"]
    limit.unregister("two")
    limit.unregister("never-registered")
    limit.acquire()
    assert first.seen == ["pause", "resume", "pause"]
    assert second.seen == ["pause", "resume"]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_connection_limit_wait_empty() -> None:
    limit = ConnectionLimit(10)
    await limit.wait_empty()  # nothing open: returns at once
    limit.acquire()
    limit.acquire()
    waiters = [asyncio.create_task(limit.wait_empty()) for _ in range(2)]
    await settle()
    limit.release()
    await settle()
    assert not any(w.done() for w in waiters)
    waiters[1].cancel()  # one waiter giving up must not wake or cancel the other
    await settle()
    assert not waiters[0].done()
    limit.release()
    await settle()
    assert waiters[0].done()
    await waiters[0]
    with pytest.raises(asyncio.CancelledError):
        await waiters[1]
    # A later round of connections gets a fresh wait.
    limit.acquire()
    again = asyncio.create_task(limit.wait_empty())
    await settle()
    assert not again.done()
    limit.release()
    await asyncio.wait_for(again, 1.0)


# -- RateLimitedLog -----------------------------------------------------------------------------


def test_rate_limited_log(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.ratelimited")
    caplog.set_level(logging.INFO, logger=logger.name)
    time = FakeClock(1000.0)
    limited = RateLimitedLog(logger, interval=1.0, clock=time.now)

    def say(at: float) -> None:
        time.set(at)
        limited.log(logging.WARNING, "accept failed: %s", "EMFILE")

    for at in (1000.0, 1000.1, 1000.5, 1000.99):
        say(at)
    assert [r.getMessage() for r in caplog.records] == ["accept failed: EMFILE"]
    say(1001.0)  # exactly one interval later
    say(1001.5)
    say(1002.0)
    say(1005.0)
    assert [r.getMessage() for r in caplog.records] == [
        "accept failed: EMFILE",
        "accept failed: EMFILE (3 similar messages suppressed)",
        "accept failed: EMFILE (1 similar messages suppressed)",
        "accept failed: EMFILE",
    ]
    assert {r.levelno for r in caplog.records} == {logging.WARNING}


def test_rate_limited_log_lets_a_new_key_through_at_once() -> None:
    time = FakeClock()
    limited = RateLimitedLog(logging.getLogger("tests.ratelimited"), interval=10.0, clock=time.now)
    # (time, key, what allow() answers: None = held back, else how many were held back)
    steps = [(0, "a", 0), (1, "a", None), (2, "a", None), (3, "b", 0), (4, "b", None),
             (5, "a", 0), (6, "a", None), (15, "a", 1), (16, "a", None)]  # fmt: skip
    answers = []
    for at, key, _ in steps:
        time.set(at)
        answers.append((at, key, limited.allow(key)))
    assert answers == steps
    limited.reset()  # e.g. after a success: the same failure again is news
    assert limited.allow("a") == 0


# -- ConnectionLimit: shares per Service and per client ------------------------------------


@pytest.mark.parametrize(
    ("maximum", "percent", "share"),
    [(40, 50, 20), (40, 25, 10), (10, 25, 3), (3, 1, 1), (100_000, 50, 50_000)],
)
def test_shares_round_up_and_are_at_least_one(maximum: int, percent: int, share: int) -> None:
    assert share_of(maximum, percent) == share


def test_a_service_at_its_share_pauses_only_its_own_listeners() -> None:
    limit = ConnectionLimit(10, service_share=50, client_share=100)
    a1, a2, b = Events(), Events(), Events()
    limit.register("a1", a1.pause, a1.resume, "a")
    limit.register("a2", a2.pause, a2.resume, "a")
    limit.register("b", b.pause, b.resume, "b")
    for n in range(5):
        assert limit.acquire("a", f"c{n}")
    assert limit.blocked("a")
    assert not limit.blocked("b")
    assert a1.seen == a2.seen == ["pause"]
    assert b.seen == []
    limit.release("a", "c0")
    assert a1.seen == a2.seen == ["pause", "resume"]
    assert b.seen == []
    assert not limit.blocked("a")


def test_a_client_at_its_share_is_refused_and_nothing_is_counted() -> None:
    limit = ConnectionLimit(8, service_share=100, client_share=25)  # 2 per client
    assert limit.acquire("a", "greedy")
    assert limit.acquire("b", "greedy")  # the share spans Services
    assert not limit.acquire("a", "greedy")
    assert limit.acquire("a", "other")
    assert (limit.active, limit.client_connections("greedy")) == (3, 2)
    limit.release("a", "greedy")
    assert limit.acquire("a", "greedy")


def test_counts_leave_no_empty_keys_and_unregister_forgets_the_service() -> None:
    limit = ConnectionLimit(10, service_share=50, client_share=50)
    events = Events()
    limit.register("l", events.pause, events.resume, "a")
    limit.acquire("a", "c")
    limit.release("a", "c")
    assert limit.service_connections("a") == 0
    assert limit.client_connections("c") == 0
    assert limit._services == {}  # the bounded-size invariant itself
    assert limit._clients == {}
    limit.unregister("l")
    limit.unregister("l")
    for n in range(5):
        limit.acquire("a", f"c{n}")
    assert events.seen == []
