"""The Kubernetes API source against a fake API server, through the real kubernetes-asyncio
client: lists, selectors, watch events, resumes, 410 re-lists, an outage, bad objects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest

from tests.support import manifests as raw
from tests.support.fake_apiserver import FakeApiServer
from tests.support.proxyrun import eventually
from userproxy.model import EndpointSlice, Node, Service
from userproxy.sources.kubernetes import KubernetesSource, label_selector, make_api_client

NODE = "node-a"
_T = TypeVar("_T", Service, EndpointSlice, Node)
DEFAULT_SELECTOR = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"

# --------------------------------------------------------------------------- objects


service = partial(raw.service, port_name="http", target_port=None)
endpoint_slice = partial(raw.endpoint_slice, port_name="http")
node = raw.node


# --------------------------------------------------------------------------- recorder


@dataclass
class Recorder:
    """Handlers that record every call as (what, name) and keep the resulting state.

    An add of an object already present, or an update/delete of one absent, is recorded in
    ``errors`` (a duplicate or missing event).
    """

    calls: list[tuple[str, str]] = field(default_factory=list)
    services: dict[str, Service] = field(default_factory=dict)
    slices: dict[str, EndpointSlice] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def _add(self, what: str, state: dict[str, _T], name: str, value: _T) -> None:
        self.calls.append((f"{what}_add", name))
        if name in state:
            self.errors.append(f"duplicate add of {what} {name}")
        state[name] = value

    def _update(self, what: str, state: dict[str, _T], name: str, value: _T) -> None:
        self.calls.append((f"{what}_update", name))
        if name not in state:
            self.errors.append(f"update of unknown {what} {name}")
        state[name] = value

    def _delete(self, what: str, state: dict[str, _T], name: str) -> None:
        self.calls.append((f"{what}_delete", name))
        if state.pop(name, None) is None:
            self.errors.append(f"delete of unknown {what} {name}")

    def on_service_add(self, service: Service) -> None:
        self._add("service", self.services, service.name, service)

    def on_service_update(self, old: Service, new: Service) -> None:
        assert old.key == new.key
        self._update("service", self.services, new.name, new)

    def on_service_delete(self, service: Service) -> None:
        self._delete("service", self.services, service.name)

    def on_services_synced(self) -> None:
        self.calls.append(("services_synced", ""))

    def on_endpointslice_add(self, endpoint_slice: EndpointSlice) -> None:
        self._add("slice", self.slices, endpoint_slice.name, endpoint_slice)

    def on_endpointslice_update(self, old: EndpointSlice, new: EndpointSlice) -> None:
        self._update("slice", self.slices, new.name, new)

    def on_endpointslice_delete(self, endpoint_slice: EndpointSlice) -> None:
        self._delete("slice", self.slices, endpoint_slice.name)

    def on_endpointslices_synced(self) -> None:
        self.calls.append(("endpointslices_synced", ""))

    def on_node_add(self, node: Node) -> None:
        self._add("node", self.nodes, node.name, node)

    def on_node_update(self, old: Node, new: Node) -> None:
        self._update("node", self.nodes, new.name, new)

    def on_node_delete(self, node: Node) -> None:
        self._delete("node", self.nodes, node.name)

    def on_node_synced(self) -> None:
        self.calls.append(("node_synced", ""))

    @property
    def synced(self) -> bool:
        done = {what for what, _ in self.calls}
        return {"services_synced", "endpointslices_synced", "node_synced"} <= done


async def wait_until(predicate: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    """Poll ``predicate`` every 10 ms for at most ``seconds``."""
    await eventually(predicate, seconds, what)


@dataclass
class Running:
    server: FakeApiServer
    source: KubernetesSource
    recorder: Recorder
    events: list[tuple[str, str]]

    def mark(self) -> int:
        """The number of handler calls so far (to look at the calls after it)."""
        return len(self.recorder.calls)

    def calls_since(self, mark: int) -> list[tuple[str, str]]:
        return self.recorder.calls[mark:]

    async def wait_calls(self, mark: int, *expected: tuple[str, str]) -> None:
        """Wait until the calls after ``mark`` contain ``expected`` (in any order)."""
        await wait_until(
            lambda: all(call in self.calls_since(mark) for call in expected),
            f"calls {expected} (got {self.calls_since(mark)})",
        )


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as fake:
        yield fake


@contextlib.asynccontextmanager
async def running_source(
    server: FakeApiServer, tmp_path: Path, *, wait: bool = True, **options: object
) -> AsyncIterator[Running]:
    api = await make_api_client(server.kubeconfig(tmp_path / "kubeconfig"))
    recorder = Recorder()
    events: list[tuple[str, str]] = []
    settings: dict[str, object] = {"backoff_initial": 0.05, "backoff_max": 0.5}
    settings.update(options)
    source = KubernetesSource(
        api,
        recorder,
        node_name=NODE,
        on_event=lambda kind, resource: events.append((kind, resource)),
        **settings,  # type: ignore[arg-type]
    )
    task = asyncio.create_task(source.run())
    try:
        running = Running(server, source, recorder, events)
        if wait:
            await wait_until(lambda: recorder.synced, "the initial lists")
            await server.wait_watching()
        yield running
        assert not task.done(), "run() ended"
        assert not recorder.errors, recorder.errors
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await source.close()


# --------------------------------------------------------------------------- tests


async def test_initial_lists_are_delivered_before_the_synced_calls(
    server: FakeApiServer, tmp_path: Path
) -> None:
    server.create("services", service("web"))
    server.create("services", service("db", namespace="prod", cluster_ip="10.96.0.11"))
    server.create("endpointslices", endpoint_slice("web-1", "web"))
    server.create("endpointslices", endpoint_slice("web-2", "web", addresses=("10.1.0.2",)))
    server.create("nodes", node(NODE, zone="z1"))
    server.create("nodes", node("node-b", zone="z2"))
    async with running_source(server, tmp_path) as run:
        calls = run.recorder.calls
        assert calls.index(("services_synced", "")) > max(
            calls.index(("service_add", "web")), calls.index(("service_add", "db"))
        )
        assert calls.index(("endpointslices_synced", "")) > max(
            calls.index(("slice_add", "web-1")), calls.index(("slice_add", "web-2"))
        )
        assert calls.index(("node_synced", "")) > calls.index(("node_add", NODE))
        assert ("node_add", "node-b") not in calls
        assert run.recorder.nodes[NODE].zone == "z1"
        assert run.recorder.services["db"].namespace == "prod"
        assert len(calls) == 8
        # What the server was asked.
        for resource in ("services", "endpointslices"):
            (listing,) = server.list_requests_for(resource)
            assert listing.label_selector == DEFAULT_SELECTOR
            (watch,) = server.watch_requests_for(resource)
            assert watch.label_selector == DEFAULT_SELECTOR
            # The client spells booleans "True"; the API server's ParseBool accepts that.
            assert watch.query["allowWatchBookmarks"].lower() == "true"
            # Nothing changed after the lists: the watch starts at the current version.
            assert watch.resource_version == str(server.resource_version)
            assert 300 <= int(watch.query["timeoutSeconds"]) <= 600
        (node_list,) = server.list_requests_for("nodes")
        assert node_list.field_selector == f"metadata.name={NODE}"
        assert node_list.label_selector is None
        assert run.events == []
        assert run.source.synced


async def test_node_synced_even_without_the_node(server: FakeApiServer, tmp_path: Path) -> None:
    server.create("nodes", node("node-b"))
    async with running_source(server, tmp_path) as run:
        assert ("node_synced", "") in run.recorder.calls
        assert run.recorder.nodes == {}
        mark = run.mark()
        server.create("nodes", node(NODE, zone="z1"))
        await run.wait_calls(mark, ("node_add", NODE))
        server.update("nodes", node(NODE, zone="z2"))
        await run.wait_calls(mark, ("node_update", NODE))
        assert run.recorder.nodes[NODE].zone == "z2"
        server.update("nodes", node("node-b", zone="z9"))
        server.delete("nodes", NODE)
        await run.wait_calls(mark, ("node_delete", NODE))
        assert run.calls_since(mark) == [
            ("node_add", NODE),
            ("node_update", NODE),
            ("node_delete", NODE),
        ]


async def test_the_server_filters_by_the_label_selector(
    server: FakeApiServer, tmp_path: Path
) -> None:
    server.create("services", service("plain"))
    server.create("services", service("headless", labels={"service.kubernetes.io/headless": ""}))
    server.create(
        "services", service("other", labels={"service.kubernetes.io/service-proxy-name": "alt"})
    )
    server.create("endpointslices", endpoint_slice("plain-1", "plain"))
    server.create(
        "endpointslices",
        endpoint_slice(
            "other-1", "other", labels={"service.kubernetes.io/service-proxy-name": "alt"}
        ),
    )
    async with running_source(server, tmp_path) as run:
        assert set(run.recorder.services) == {"plain"}
        assert set(run.recorder.slices) == {"plain-1"}
        mark = run.mark()
        # A label change that leaves the selection arrives as a deletion (and back as an add).
        server.update(
            "services", service("plain", labels={"service.kubernetes.io/service-proxy-name": "x"})
        )
        await run.wait_calls(mark, ("service_delete", "plain"))
        server.update("services", service("plain"))
        await run.wait_calls(mark, ("service_add", "plain"))


async def test_service_proxy_name_selects_only_its_objects(
    server: FakeApiServer, tmp_path: Path
) -> None:
    mine = {"service.kubernetes.io/service-proxy-name": "alt"}
    server.create("services", service("plain"))
    server.create("services", service("mine", labels=mine))
    server.create("endpointslices", endpoint_slice("plain-1", "plain"))
    server.create("endpointslices", endpoint_slice("mine-1", "mine", labels=mine))
    async with running_source(server, tmp_path, proxy_name="alt") as run:
        assert set(run.recorder.services) == {"mine"}
        assert set(run.recorder.slices) == {"mine-1"}
        expected = "!service.kubernetes.io/headless,service.kubernetes.io/service-proxy-name=alt"
        assert expected == label_selector("alt")
        for resource in ("services", "endpointslices"):
            assert server.list_requests_for(resource)[0].label_selector == expected
            assert server.watch_requests_for(resource)[0].label_selector == expected


async def test_watch_delivers_creates_updates_and_deletes(
    server: FakeApiServer, tmp_path: Path
) -> None:
    async with running_source(server, tmp_path) as run:
        mark = run.mark()
        server.create("services", service("web", port=80))
        server.create("endpointslices", endpoint_slice("web-1", "web"))
        await run.wait_calls(mark, ("service_add", "web"), ("slice_add", "web-1"))
        server.update("services", service("web", port=81))
        server.update("endpointslices", endpoint_slice("web-1", "web", addresses=("10.1.0.9",)))
        await run.wait_calls(mark, ("service_update", "web"), ("slice_update", "web-1"))
        assert run.recorder.services["web"].ports[0].port == 81
        assert run.recorder.slices["web-1"].endpoints[0].address == "10.1.0.9"
        # An update that changes nothing the proxy uses causes no call.
        unchanged = service("web", port=81)
        unchanged["metadata"] = {"name": "web", "namespace": "default", "annotations": {"a": "b"}}
        server.update("services", unchanged)
        server.delete("endpointslices", "web-1")
        server.delete("services", "web")
        await run.wait_calls(mark, ("service_delete", "web"), ("slice_delete", "web-1"))
        assert sorted(run.calls_since(mark)) == sorted(
            [
                ("service_add", "web"),
                ("slice_add", "web-1"),
                ("service_update", "web"),
                ("slice_update", "web-1"),
                ("slice_delete", "web-1"),
                ("service_delete", "web"),
            ]
        )
        assert server.list_requests == {"services": 1, "endpointslices": 1, "nodes": 1}


@pytest.mark.parametrize("abort", [True, False], ids=["reset", "clean-close"])
async def test_dropped_watch_resumes_without_relist_or_duplicates(
    server: FakeApiServer, tmp_path: Path, abort: bool
) -> None:
    server.create("services", service("a"))
    server.create("services", service("b"))
    async with running_source(server, tmp_path) as run:
        mark = run.mark()
        rv_before = run.source.services.resource_version
        server.hold_watches()  # the gap: the client cannot watch again yet
        assert server.drop_watches(abort=abort) == 3
        server.create("services", service("c"))
        server.update("services", service("a", port=99))
        server.delete("services", "b")
        server.create("endpointslices", endpoint_slice("c-1", "c"))
        await asyncio.sleep(0.2)
        assert run.calls_since(mark) == []  # nothing arrives during the gap
        server.release_watches()
        await run.wait_calls(
            mark,
            ("service_add", "c"),
            ("service_update", "a"),
            ("service_delete", "b"),
            ("slice_add", "c-1"),
        )
        await server.wait_watching()
        await asyncio.sleep(0.1)
        assert len(run.calls_since(mark)) == 4  # no duplicates
        assert server.list_requests == {"services": 1, "endpointslices": 1, "nodes": 1}
        resume = server.watch_requests_for("services")[-1]
        assert resume.resource_version == rv_before
        assert ("watch_restart", "services") in run.events
        assert ("relist", "services") not in run.events


async def test_410_gone_relists_and_reconciles(server: FakeApiServer, tmp_path: Path) -> None:
    for name in ("keep", "drop", "change"):
        server.create("services", service(name))
        server.create("endpointslices", endpoint_slice(f"{name}-1", name))
    async with running_source(server, tmp_path) as run:
        mark = run.mark()
        server.hold_watches()
        server.drop_watches()
        # Changes the client misses, then the history is compacted away.
        server.delete("services", "drop")
        server.delete("endpointslices", "drop-1")
        server.create("services", service("new"))
        server.create("endpointslices", endpoint_slice("new-1", "new"))
        server.update("services", service("change", port=81))
        server.compact()
        server.release_watches()
        await run.wait_calls(
            mark,
            ("service_delete", "drop"),
            ("slice_delete", "drop-1"),
            ("service_add", "new"),
            ("slice_add", "new-1"),
            ("service_update", "change"),
        )
        await server.wait_watching()
        await asyncio.sleep(0.1)
        assert len(run.calls_since(mark)) == 5  # nothing for the unchanged objects
        assert server.list_requests["services"] == 2
        assert server.list_requests["endpointslices"] == 2
        assert ("relist", "services") in run.events
        assert ("relist", "endpointslices") in run.events
        assert set(run.recorder.services) == {"keep", "change", "new"}
        assert set(run.recorder.slices) == {"keep-1", "change-1", "new-1"}
        # The new watch starts at the re-list's resourceVersion and works.
        server.create("services", service("after"))
        await run.wait_calls(mark, ("service_add", "after"))


async def test_api_server_outage_of_10_seconds(server: FakeApiServer, tmp_path: Path) -> None:
    server.create("services", service("a"))
    server.create("endpointslices", endpoint_slice("a-1", "a"))
    async with running_source(server, tmp_path, backoff_initial=0.1, backoff_max=1.0) as run:
        mark = run.mark()
        await server.stop()
        # Changes made while the client cannot reach the server.
        server.create("services", service("b"))
        server.delete("endpointslices", "a-1")
        server.create("endpointslices", endpoint_slice("b-1", "b"))
        await asyncio.sleep(10)
        assert run.calls_since(mark) == []
        assert ("api_error", "services") in run.events  # it kept trying
        errors = run.events.count(("api_error", "services"))
        assert 3 <= errors <= 60, errors  # backed off, but not given up
        await server.start()
        await run.wait_calls(
            mark, ("service_add", "b"), ("slice_delete", "a-1"), ("slice_add", "b-1")
        )
        await server.wait_watching()
        server.create("services", service("c"))
        await run.wait_calls(mark, ("service_add", "c"))
        assert len(run.calls_since(mark)) == 4
        # Resumed from the last resourceVersion: the history covered the outage.
        assert server.list_requests == {"services": 1, "endpointslices": 1, "nodes": 1}


async def test_malformed_objects_are_skipped_with_a_warning(
    server: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="userproxy.sources.reflector")
    server.create("services", service("good"))
    server.inject("services", service("", cluster_ip="10.96.0.12"))  # no name
    server.create("endpointslices", endpoint_slice("good-1", "good"))
    server.inject("endpointslices", endpoint_slice("bad-1", "good", port="abc"))
    async with running_source(server, tmp_path) as run:
        assert set(run.recorder.services) == {"good"}
        assert set(run.recorder.slices) == {"good-1"}
        text = caplog.text
        assert "EndpointSlice default/bad-1" in text
        assert "ports[0].port" in text
        assert "Service default/<unnamed>" in text
        assert "metadata.name" in text
        assert run.events.count(("invalid_object", "endpointslices")) == 1
        assert run.events.count(("invalid_object", "services")) == 1
        caplog.clear()
        mark = run.mark()
        # In the stream: a bad new object, a good object turning bad (its last good
        # version stays), then good events still arrive.
        server.inject("endpointslices", endpoint_slice("bad-2", "good", addresses=("nope",)))
        server.update("endpointslices", endpoint_slice("good-1", "good", port=-1))
        server.create("services", service("later"))
        server.create("endpointslices", endpoint_slice("later-1", "later"))
        await run.wait_calls(mark, ("service_add", "later"), ("slice_add", "later-1"))
        assert sorted(run.calls_since(mark)) == [("service_add", "later"), ("slice_add", "later-1")]
        assert "EndpointSlice default/bad-2" in caplog.text
        assert "EndpointSlice default/good-1" in caplog.text
        assert run.recorder.slices["good-1"].ports[0].port == 8080
        # Deleting the object that turned bad deletes it.
        server.delete("endpointslices", "good-1")
        await run.wait_calls(mark, ("slice_delete", "good-1"))
        assert server.list_requests["endpointslices"] == 1
        assert not any(kind == "watch_restart" for kind, _ in run.events)


async def test_bookmarks_advance_the_resume_version(server: FakeApiServer, tmp_path: Path) -> None:
    async with running_source(server, tmp_path) as run:
        start = run.source.services.resource_version
        for i in range(3):  # changes to other resources move the cluster's resourceVersion
            server.create("endpointslices", endpoint_slice(f"s-{i}", "x"))
        await wait_until(lambda: len(run.recorder.slices) == 3, "the slices")
        assert run.source.services.resource_version == start
        server.bookmark()
        current = str(server.resource_version)
        await wait_until(
            lambda: run.source.services.resource_version == current, "the bookmark's version"
        )
        server.drop_watches()
        await wait_until(lambda: len(server.watch_requests_for("services")) == 2, "a resume")
        assert server.watch_requests_for("services")[-1].resource_version == current
        # Compacting now costs no re-list: the bookmark kept the client's version current.
        server.drop_watches()
        server.compact()
        await wait_until(lambda: len(server.watch_requests_for("services")) == 3, "a resume")
        await server.wait_watching()
        assert server.list_requests["services"] == 1


async def test_periodic_resync_without_changes_causes_no_calls(
    server: FakeApiServer, tmp_path: Path
) -> None:
    server.create("services", service("a"))
    server.create("endpointslices", endpoint_slice("a-1", "a"))
    server.create("nodes", node(NODE))
    async with running_source(server, tmp_path, resync_period=0.2) as run:
        mark = run.mark()
        await wait_until(lambda: server.list_requests["services"] >= 4, "three resyncs")
        await wait_until(lambda: server.list_requests["nodes"] >= 4, "three node resyncs")
        assert run.calls_since(mark) == []
        assert run.events == []
        # Changes still arrive between resyncs.
        server.create("services", service("b"))
        await run.wait_calls(mark, ("service_add", "b"))


async def test_paged_lists(server: FakeApiServer, tmp_path: Path) -> None:
    for i in range(7):
        server.create("services", service(f"s{i}"))
    async with running_source(server, tmp_path, page_size=3) as run:
        assert set(run.recorder.services) == {f"s{i}" for i in range(7)}
        pages = server.list_requests_for("services")
        assert [p.query.get("limit") for p in pages] == ["3", "3", "3"]
        assert "continue" not in pages[0].query
        assert "continue" in pages[1].query
        assert "continue" in pages[2].query


async def test_server_side_watch_timeout_restarts_quietly(
    server: FakeApiServer, tmp_path: Path
) -> None:
    async with running_source(server, tmp_path, watch_timeout=1) as run:
        await wait_until(lambda: server.watch_requests["services"] >= 3, "two restarts")
        assert {int(r.query["timeoutSeconds"]) for r in server.watch_requests_for("services")} == {
            1
        }
        assert server.list_requests["services"] == 1
        assert run.events == []
        mark = run.mark()
        server.create("services", service("a"))
        await run.wait_calls(mark, ("service_add", "a"))


async def test_initial_list_waits_for_the_server(server: FakeApiServer, tmp_path: Path) -> None:
    await server.stop()
    async with running_source(server, tmp_path, wait=False) as run:
        await wait_until(lambda: ("api_error", "services") in run.events, "a failed list")
        assert run.recorder.calls == []
        server.create("services", service("a"))
        await server.start()
        await wait_until(lambda: run.recorder.synced, "the initial lists")
        assert run.recorder.services.keys() == {"a"}
