"""Failed syncs are retried: the runner's backoff (fake clock, no sleeps) and the proxier's
per-Service isolation and memory of what failed (a fake listener set)."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

import pytest

from tests.support.clock import settle
from tests.support.recorders import RecordingEffects
from tests.support.runner import Harness, start_runner
from userproxy.balancers.registry import BalancerRegistry
from userproxy.control.proxier import Proxier
from userproxy.control.trackers import ChangeRecorder
from userproxy.model import ListenerSpec, Protocol, Service, ServiceKey, ServicePort

# -- the runner ------------------------------------------------------------------------------


async def start(started: list[Harness], outcome: Callable[[int], bool | Exception]) -> Harness:
    """A runner (no rate limit, 30 s period) whose n-th sync (from 1) returns or raises
    ``outcome(n)``."""
    return await start_runner(started, min_interval=0.0, outcome=outcome)


@pytest.mark.parametrize(
    ("failures", "expected"),
    [
        pytest.param(0, [0.0], id="no-failure-no-retry"),
        pytest.param(1, [0.0, 0.5], id="one-failure"),
        pytest.param(4, [0.0, 0.5, 1.5, 3.5, 7.5], id="backoff-doubles"),
        pytest.param(6, [0.0, 0.5, 1.5, 3.5, 7.5, 12.5, 17.5], id="backoff-capped-at-5s"),
    ],
)
async def test_a_failed_sync_is_retried_with_backoff(
    harnesses: list[Harness], failures: int, expected: list[float]
) -> None:
    r = await start(harnesses, lambda n: n > failures)
    await r.request()
    await r.step_until(25.0)
    assert r.syncs == expected
    assert r.runner.failures == 0
    assert r.runner.retry_at is None, "no retry pending after a sync that applied all"


async def test_an_exception_is_retried_and_its_traceback_logged_once(
    harnesses: list[Harness], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="userproxy.control.runner")
    r = await start(harnesses, lambda n: RuntimeError("broken") if n <= 3 else True)
    await r.request()
    await r.step_until(10.0)
    assert r.syncs == [0.0, 0.5, 1.5, 3.5]
    records = [rec for rec in caplog.records if rec.name == "userproxy.control.runner"]
    assert len(records) == 1, "the same error again within a minute is not logged again"
    assert records[0].exc_info is not None


async def test_a_sync_that_runs_meanwhile_is_the_retry(harnesses: list[Harness]) -> None:
    r = await start(harnesses, lambda n: n > 1)
    await r.request()
    r.clock.advance(0.25)
    await r.request()
    await r.step_until(5.0)
    assert r.syncs == [0.0, 0.25], "the asked-for sync succeeded: no retry at 0.5"


async def test_retry_after_wakes_an_idle_runner(harnesses: list[Harness]) -> None:
    r = await start(harnesses, lambda n: True)
    r.runner.retry_after(2.0)
    r.runner.retry_after(3.0)  # the earliest ask wins
    await settle()
    await r.step_until(5.0)
    assert r.syncs == [2.0]


# -- the proxier -----------------------------------------------------------------------------


def web(name: str, ip: str, port: int = 80) -> Service:
    return Service("default", name, cluster_ips=(ip,), ports=(ServicePort("", Protocol.TCP, port),))


def ports(specs: tuple[ListenerSpec, ...]) -> list[int]:
    return [spec.port for spec in specs]


def build() -> tuple[ChangeRecorder, Proxier, RecordingEffects]:
    recorder = ChangeRecorder("node-a", lambda: None)
    listeners = RecordingEffects()
    proxier = Proxier(recorder, listeners, BalancerRegistry())
    recorder.on_services_synced()
    recorder.on_endpointslices_synced()
    return recorder, proxier, listeners


A, B, C = (ServiceKey("default", name) for name in "abc")
EMFILE = OSError(errno.EMFILE, "Too many open files")


@pytest.mark.parametrize(
    "error",
    [EMFILE, RuntimeError("a bug"), KeyError("x")],
    ids=["emfile", "runtime-error", "key-error"],
)
def test_one_failing_service_does_not_stop_the_others(error: Exception) -> None:
    recorder, proxier, listeners = build()
    listeners.broken[A] = error
    for name, ip in (("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3")):
        recorder.on_service_add(web(name, ip))
    assert proxier.sync() is False
    assert set(listeners.applied) == {B, C}
    assert set(proxier.failed) == {A}
    assert proxier.status.failed_services == 1
    assert A in proxier.plans, "the desired state is remembered"


def test_a_failed_service_is_reapplied_at_every_sync_until_it_applies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder, proxier, listeners = build()
    listeners.broken[A] = EMFILE
    recorder.on_service_add(web("a", "10.0.0.1"))
    recorder.on_service_add(web("b", "10.0.0.2"))
    with caplog.at_level(logging.INFO, logger="userproxy.control.proxier"):
        assert proxier.sync() is False
        listeners.calls.clear()
        # No change at all: the failed Service alone is applied again (same plan).
        assert proxier.sync() is False
        assert listeners.keys == [A]
        # It changes while failing: the new plan is what is applied.
        recorder.on_service_update(web("a", "10.0.0.1"), web("a", "10.0.0.1", port=81))
        del listeners.broken[A]
        assert proxier.sync() is True
        assert ports(listeners.applied[A]) == [81]
        assert not proxier.failed
        listeners.calls.clear()
        assert proxier.sync() is True
        assert listeners.keys == [], "applied: nothing more to do"
    lines = [r for r in caplog.records if r.name == "userproxy.control.proxier"]
    warnings = [r for r in lines if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "the same failure is logged once"
    assert "default/a: Too many open files" in warnings[0].getMessage()
    assert any("every Service applied again" in r.getMessage() for r in lines)


def test_a_failed_removal_is_retried() -> None:
    recorder, proxier, listeners = build()
    recorder.on_service_add(web("a", "10.0.0.1"))
    assert proxier.sync() is True
    listeners.broken[A] = RuntimeError("close failed")
    recorder.on_service_delete(web("a", "10.0.0.1"))
    assert proxier.sync() is False
    del listeners.broken[A]
    listeners.calls.clear()
    assert proxier.sync() is True
    assert listeners.keys == [A]
    assert listeners.applied[A] == ()


def test_node_addresses_failing_keep_the_changes() -> None:
    recorder = ChangeRecorder("node-a", lambda: None)
    listeners = RecordingEffects()
    reads: list[int] = []

    def addresses() -> tuple[str, ...]:
        reads.append(1)
        if len(reads) == 1:
            raise EMFILE
        return ()

    proxier = Proxier(recorder, listeners, BalancerRegistry(), node_addresses=addresses)
    recorder.on_services_synced()
    recorder.on_endpointslices_synced()
    recorder.on_service_add(web("a", "10.0.0.1"))
    assert proxier.sync() is False, "retried to read the addresses again"
    assert set(listeners.applied) == {A}, "the pending change is applied all the same"
    assert proxier.sync() is True
