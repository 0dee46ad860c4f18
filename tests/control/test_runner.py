"""SyncRunner driven by a fake clock (kube-proxy rules: "Sync loop"; upstream
``BoundedFrequencyRunner``): no real sleeps, the loop is stepped with ``asyncio.sleep(0)``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from tests.support.clock import settle
from tests.support.runner import Harness, start_runner
from userproxy.control.runner import SyncRunner


async def start(
    started: list[Harness],
    *,
    min_interval: float = 1.0,
    max_interval: float = 30.0,
    burst: int = 2,
    fail: Callable[[int], bool] = lambda n: False,
) -> Harness:
    """A runner whose n-th sync raises when ``fail(n)``."""
    return await start_runner(
        started,
        min_interval=min_interval,
        max_interval=max_interval,
        burst=burst,
        outcome=lambda n: RuntimeError(f"sync {n} broke") if fail(n) else True,
    )


async def test_no_sync_without_a_request_before_max_interval(harnesses: list[Harness]) -> None:
    h = await start(harnesses)
    assert h.count == 0
    await h.step(29.0)
    assert h.count == 0


@pytest.mark.parametrize("requests", [1, 2, 5, 100], ids=lambda n: f"{n}-requests")
async def test_requests_before_the_runner_wakes_coalesce(
    harnesses: list[Harness], requests: int
) -> None:
    h = await start(harnesses)
    for _ in range(requests):
        h.runner.request()
    await settle()
    assert h.count == 1
    assert h.runner.runs == 1
    await settle()
    assert h.count == 1, "no extra sync after the merged requests"


async def test_requests_while_waiting_for_a_token_coalesce(harnesses: list[Harness]) -> None:
    h = await start(harnesses, min_interval=1.0, burst=1)
    await h.request()
    assert h.syncs == [0.0]
    for _ in range(5):
        await h.request()
    assert h.count == 1, "rate limited: the token is not back yet"
    await h.step(1.0)
    assert h.syncs == [0.0, 1.0], "the five requests made one sync"
    await h.step(5.0)
    assert h.count == 2


async def test_burst_of_two_then_min_interval(harnesses: list[Harness]) -> None:
    h = await start(harnesses, min_interval=1.0, burst=2)
    await h.request()
    await h.request()
    assert h.syncs == [0.0, 0.0], "a burst of two runs at once"
    await h.request()
    assert h.count == 2, "the third request waits for a token"
    await h.step(0.5)
    assert h.count == 2
    await h.step(0.5)
    assert h.syncs == [0.0, 0.0, 1.0]
    # Steady state: one sync per min_interval however often it is asked.
    await h.request()
    assert h.count == 3
    await h.step(0.75)
    assert h.count == 3
    await h.step(0.25)
    assert h.syncs == [0.0, 0.0, 1.0, 2.0]


async def test_tokens_refill_up_to_burst_after_a_quiet_period(harnesses: list[Harness]) -> None:
    h = await start(harnesses, min_interval=1.0, max_interval=1000.0, burst=2)
    for _ in range(2):
        await h.request()
    assert h.count == 2
    await h.step(10.0)  # refills two tokens, not ten
    for _ in range(3):
        await h.request()
    assert h.syncs == [0.0, 0.0, 10.0, 10.0], "third request after the quiet period waits"
    await h.step(1.0)
    assert h.syncs == [0.0, 0.0, 10.0, 10.0, 11.0]


async def test_max_interval_forces_a_periodic_sync(harnesses: list[Harness]) -> None:
    h = await start(harnesses, min_interval=1.0, max_interval=30.0)
    await h.step(29.0)
    assert h.count == 0
    await h.step(1.0)
    assert h.syncs == [30.0]
    await h.step(29.0)
    assert h.count == 1
    await h.step(1.0)
    assert h.syncs == [30.0, 60.0]


async def test_periodic_timer_restarts_after_a_requested_sync(harnesses: list[Harness]) -> None:
    h = await start(harnesses, min_interval=1.0, max_interval=30.0)
    h.clock.advance(20.0)
    await h.request()
    assert h.syncs == [20.0]
    await h.step(29.0)
    assert h.count == 1, "the period counts from the last sync"
    await h.step(1.0)
    assert h.syncs == [20.0, 50.0]


async def test_set_intervals_takes_effect_in_the_wait_already_begun(
    harnesses: list[Harness],
) -> None:
    """A reload (SIGHUP) shortening the period wakes the runner: the next periodic sync
    counts the new period from the last sync, not the old one."""
    h = await start(harnesses, min_interval=1.0, max_interval=30.0)
    await h.step(5.0)
    h.runner.set_intervals(1.0, 10.0)
    await settle()
    assert h.count == 0
    await h.step(4.9)
    assert h.count == 0
    await h.step(0.1)
    assert h.syncs == [10.0], "10 s after the start, not 30"
    await h.step(10.0)
    assert h.syncs == [10.0, 20.0]


async def test_set_intervals_min_interval_rate_limits_from_then_on(
    harnesses: list[Harness],
) -> None:
    h = await start(harnesses, min_interval=0.0, max_interval=30.0)
    h.runner.set_intervals(2.0, 30.0)
    for _ in range(3):
        await h.request()
    assert h.syncs == [0.0, 0.0], "burst of two, then the new min interval"
    await h.step(2.0)
    assert h.syncs == [0.0, 0.0, 2.0]
    with pytest.raises(ValueError, match="positive"):
        h.runner.set_intervals(1.0, 0.0)


async def test_min_interval_zero_syncs_on_every_request(harnesses: list[Harness]) -> None:
    h = await start(harnesses, min_interval=0.0, max_interval=30.0)
    for expected in range(1, 6):
        await h.request()
        assert h.count == expected
    assert h.syncs == [0.0] * 5
    assert h.clock.pending == 1, "only the periodic timer is waiting"


async def test_a_failing_sync_is_logged_and_the_runner_goes_on(
    harnesses: list[Harness], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="userproxy.control.runner")
    h = await start(harnesses, min_interval=0.0, fail=lambda n: n == 1)
    await h.request()
    assert h.count == 1
    assert not h.task.done()
    errors = [r for r in caplog.records if r.name == "userproxy.control.runner"]
    assert len(errors) == 1
    assert errors[0].levelno == logging.ERROR
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], RuntimeError)
    await h.request()
    assert h.count == 2
    await h.step(30.0)
    assert h.count == 3, "the periodic sync still runs after a failure"


async def test_cancel_while_idle_ends_run(harnesses: list[Harness]) -> None:
    h = await start(harnesses)
    h.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await h.task
    await settle()
    assert h.clock.pending == 0, "the timer sleep is cancelled too"
    harnesses.remove(h)


async def test_cancel_while_waiting_for_a_token_ends_run(harnesses: list[Harness]) -> None:
    h = await start(harnesses, min_interval=1.0, burst=1)
    await h.request()
    await h.request()
    assert h.count == 1
    assert h.clock.pending == 1, "waiting for the token"
    h.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await h.task
    assert h.clock.pending == 0
    await h.step(10.0)
    assert h.count == 1, "no sync after cancellation"
    harnesses.remove(h)


@pytest.mark.parametrize(
    ("min_interval", "max_interval"),
    [(-1.0, 30.0), (1.0, 0.0), (0.0, -5.0)],
    ids=["negative-min", "zero-max", "negative-max"],
)
def test_invalid_intervals_are_rejected(min_interval: float, max_interval: float) -> None:
    with pytest.raises(ValueError, match="intervals"):
        SyncRunner(lambda: None, min_interval=min_interval, max_interval=max_interval)
