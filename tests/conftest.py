"""Suite-wide configuration: which event loops the async tests run on, which tests are
slow, and a loop whose exception handler fires fails the test.

Invariants:
- every async test runs with an exception handler on its loop that records each call; a
  test whose loop reported anything (a callback that raised, a task destroyed while
  pending, an exception never retrieved) fails at teardown with the contexts printed, as
  uvloop's tests/_testbase does;
- TCP listeners run the relay each test's loop factory selects (``fast_relay.selected``):
  tests/dataplane's TCP tests run the pure-Python relay (tcp_relay.py, the reference) on
  both loops and the compiled one (_relay.c) on uvloop, ids ``asyncio``, ``uvloop`` and
  ``uvloop-compiled``; every other test runs what production runs (the compiled relay
  where it is built).  Where it is not built, ``uvloop-compiled`` fails: it never skips;
- ``slow`` marks the load, outage and subprocess tests, chosen here by directory, file or
  test function (``SLOW``) so the test modules need no marker; ``pytest -m "not slow"`` is
  the quick loop and ``.ci/run`` runs everything.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import settings

from userproxy.dataplane import fast_relay

# Property tests assert behaviour, never speed: no per-example deadline (on a loaded
# machine hypothesis' default 200 ms fails examples that are merely slow).
settings.register_profile("userproxy", deadline=None)
settings.load_profile("userproxy")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _on_relay(factory: LoopFactory, *, compiled: bool) -> LoopFactory:
    """``factory``, selecting the relay new TCP listeners use as it makes the loop."""

    def make() -> asyncio.AbstractEventLoop:
        fast_relay.selected = compiled
        return factory()

    return make


#: The relay production selects: the compiled one wherever it is built.
DEFAULT_COMPILED = fast_relay.AVAILABLE
LOOPS: dict[str, LoopFactory] = {
    "asyncio": _on_relay(asyncio.new_event_loop, compiled=DEFAULT_COMPILED),
    "uvloop": _on_relay(uvloop.new_event_loop, compiled=DEFAULT_COMPILED),
}
#: tests/dataplane's TCP tests: the reference relay on both loops, the compiled relay on
#: uvloop (its engine is the same on either loop: the loop only watches one descriptor,
#: and the compiled relay runs on asyncio in every other test).
RELAY_LOOPS: dict[str, LoopFactory] = {
    "asyncio": _on_relay(asyncio.new_event_loop, compiled=False),
    "uvloop": _on_relay(uvloop.new_event_loop, compiled=False),
    "uvloop-compiled": _on_relay(uvloop.new_event_loop, compiled=True),
}
#: Where RELAY_LOOPS apply (relative to tests/), and the exceptions (no TCP relay).
RELAY_TESTS = "dataplane/"
NOT_RELAY_TESTS = ("dataplane/test_udp.py", "dataplane/test_fast_relay.py")

HERE = Path(__file__).parent

#: Directories, files and ``file::function`` names (relative to tests/) of the tests that
#: run the proxy as a subprocess, hold load or an outage, build network namespaces, fuzz,
#: or wait out a grace period or timeout of seconds (3 s and more each).
SLOW = (
    "connect/test_connect.py",
    "connect/test_connect_errors.py",
    "netns",
    "process",
    "soak",
    "stress",
    "udp/test_udp_load.py",
    "udp/test_dns.py::test_2000_queries_through_a_uvloop_subprocess",
    "sources/test_kubernetes.py::test_api_server_outage_of_10_seconds",
    "sources/test_kubernetes_proxy.py::test_open_connection_survives_watch_trouble",
    "sources/test_manifest_fuzz.py",
    "dataplane/test_integrity.py::test_concurrent_clients_under_repeated_stalls",
    "dataplane/test_resets.py::test_deleted_service_keeps_its_connection_after_the_grace",
    "dataplane/test_tcp_lifecycle.py::test_idle_connection_ends_after_idle_timeout",
    "dataplane/test_tcp_proxy.py::test_deleted_service_stops_accepting_open_connections_finish",
)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Data-path tests (marked ``both_loops``) run once on each loop (tests/dataplane's TCP
    tests also once with each relay); the rest on asyncio."""
    if item.get_closest_marker("both_loops") is not None:
        path = item.path.relative_to(HERE).as_posix() if item.path.is_relative_to(HERE) else ""
        if path.startswith(RELAY_TESTS) and path not in NOT_RELAY_TESTS:
            return RELAY_LOOPS
        return LOOPS
    return {"asyncio": LOOPS["asyncio"]}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test below or named by a ``SLOW`` entry as ``slow``."""
    for item in items:
        if not item.path.is_relative_to(HERE):
            continue
        path = item.path.relative_to(HERE).as_posix()
        names = {path, f"{path}::{getattr(item, 'originalname', item.name)}"}
        if any(slow in names or path.startswith(f"{slow}/") for slow in SLOW):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fail_on_loop_errors(request: pytest.FixtureRequest) -> None:
    """Async tests get ``loop_errors``; sync tests have no loop of the test to watch (and
    run the default relay: an async test's loop factory selects its own)."""
    if inspect.iscoroutinefunction(getattr(request, "function", None)):
        request.getfixturevalue("loop_errors")
    else:
        fast_relay.selected = DEFAULT_COMPILED


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Every context the test's loop hands its exception handler; the test fails at
    teardown if there is one. A test that provokes such a report on purpose takes this
    fixture, checks the list and empties it."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    # One more round of the loop: callbacks scheduled by the test's last await report now.
    await asyncio.sleep(0)
    loop.set_exception_handler(previous)
    if errors:
        pytest.fail(
            "the loop's exception handler fired:\n" + "\n".join(map(repr, errors)),
            pytrace=False,
        )
