"""One Reflector on its own against the fake API server: what it does with each odd line
a watch stream may carry (client-go's reflector.go handles the same cases in watchHandler).

Each case writes one line on the open Services watch, then creates a Service: the create
must arrive (the watch goes on, is resumed, or a re-list finds it), and the reflector must
have reported exactly the events of the case, listed and watched as often as it says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kubernetes_asyncio import client as k8s_client

from tests.sources.test_kubernetes import service, wait_until
from tests.support.fake_apiserver import FakeApiServer
from userproxy.model import Service
from userproxy.sources.decode import decode_service
from userproxy.sources.kubernetes import make_api_client
from userproxy.sources.list_watch import ListWatch
from userproxy.sources.reflector import (
    EventKind,
    Reflector,
    ReflectorOptions,
    ResourceHandlers,
)


def _line(event: object) -> bytes:
    return json.dumps(event).encode() + b"\n"


def _error(code: int) -> bytes:
    status = {"kind": "Status", "status": "Failure", "message": "odd", "code": code}
    return _line({"type": "ERROR", "object": status})


# (id, the line, the events reported, LIST requests, WATCH requests) in all.
STREAM_CASES: list[tuple[str, bytes, list[EventKind], int, int]] = [
    ("not-json", b"<html>proxy error</html>\n", ["watch_restart"], 1, 2),
    ("event-without-object", _line({"type": "ADDED"}), ["watch_restart"], 1, 2),
    ("error-500", _error(500), ["api_error"], 1, 2),
    ("error-410-relists", _error(410), ["relist"], 2, 2),
    ("unknown-type-ignored", _line({"type": "SYNC", "object": {"metadata": {}}}), [], 1, 1),
    ("bookmark-without-version", _line({"type": "BOOKMARK", "object": {}}), [], 1, 1),
]


class Running:
    """A running Reflector of Services and what it called and reported."""

    def __init__(self, core: k8s_client.CoreV1Api) -> None:
        self.calls: list[tuple[str, str]] = []
        self.events: list[EventKind] = []
        self.reflector: Reflector[Service] = Reflector(
            ListWatch("services", "Service", True, core.list_service_for_all_namespaces),
            decode_service,
            ResourceHandlers(
                lambda new: self.calls.append(("add", new.name)),
                lambda old, new: self.calls.append(("update", new.name)),
                lambda old: self.calls.append(("delete", old.name)),
                lambda: self.calls.append(("synced", "")),
            ),
            ReflectorOptions(backoff_initial=0.05, backoff_max=0.5),
            lambda kind, resource: self.events.append(kind),
        )


@contextlib.asynccontextmanager
async def running_reflector(server: FakeApiServer, tmp_path: Path) -> AsyncIterator[Running]:
    api = await make_api_client(server.kubeconfig(tmp_path / "kubeconfig"))
    run = Running(k8s_client.CoreV1Api(api))
    task = asyncio.create_task(run.reflector.run())
    try:
        await wait_until(lambda: run.reflector.synced, "the first list")
        await server.wait_watching(("services",))
        yield run
        assert not task.done(), "run() ended"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await api.close()


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as fake:
        yield fake


@pytest.mark.parametrize("case", STREAM_CASES, ids=[case[0] for case in STREAM_CASES])
async def test_reflector_handles_each_odd_line_of_a_watch(
    server: FakeApiServer, tmp_path: Path, case: tuple[str, bytes, list[EventKind], int, int]
) -> None:
    _, line, events, lists, watches = case
    server.create("services", service("a"))
    async with running_reflector(server, tmp_path) as run:
        assert run.calls == [("add", "a"), ("synced", "")]
        listed_at = run.reflector.resource_version
        assert server.send_raw("services", line) == 1
        server.create("services", service("b"))
        await wait_until(lambda: ("add", "b") in run.calls, "the Service created after it")
        await wait_until(lambda: server.watch_requests["services"] >= watches, "the watch")
        assert run.calls == [("add", "a"), ("synced", ""), ("add", "b")]
        assert run.events == events
        assert server.list_requests["services"] == lists
        assert server.watch_requests["services"] == watches
        if watches == 2 and lists == 1:  # resumed where it stopped, not re-listed
            assert server.watch_requests_for("services")[-1].resource_version == listed_at
        assert run.reflector.resource_version == str(server.resource_version)


def test_reflector_options_are_checked() -> None:
    for bad in (
        {"resync_period": -1.0},
        {"backoff_initial": 0.0},
        {"backoff_initial": 2.0, "backoff_max": 1.0},
        {"watch_timeout": 0.5},
        {"page_size": 0},
    ):
        with pytest.raises(ValueError, match=r"must be|need"):
            ReflectorOptions(**bad)
