"""Tests for loading manifest files and for the polling manifest source."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import yaml

from userproxy.model import EndpointSlice, Node, Protocol, Service, ServiceKey, ServicePort
from userproxy.sources.manifests import (
    ManifestError,
    ManifestSource,
    ManifestState,
    load_manifests,
)

# --------------------------------------------------------------------------- fixtures


def service(
    name: str,
    *,
    namespace: str | None = None,
    port: object = 80,
    cluster_ip: str = "10.96.0.1",
    labels: dict[str, str] | None = None,
) -> dict[str, object]:
    metadata: dict[str, object] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    if labels is not None:
        metadata["labels"] = labels
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": port}]},
    }


def endpoint_slice(
    name: str,
    service_name: str,
    *,
    addresses: tuple[str, ...] = ("10.1.0.1",),
    address_type: str = "IPv4",
    labels: dict[str, str] | None = None,
) -> dict[str, object]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/service-name": service_name, **(labels or {})},
        },
        "addressType": address_type,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [address]} for address in addresses],
    }


def node(name: str, zone: str | None = None) -> dict[str, object]:
    metadata: dict[str, object] = {"name": name}
    if zone is not None:
        metadata["labels"] = {"topology.kubernetes.io/zone": zone}
    return {"apiVersion": "v1", "kind": "Node", "metadata": metadata}


def write_yaml(path: Path, *documents: object) -> Path:
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False), encoding="utf-8")
    return path


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def key(name: str, namespace: str = "default") -> ServiceKey:
    return ServiceKey(namespace, name)


# --------------------------------------------------------------------------- load_manifests


def test_load_directory_of_yaml_json_and_lists(tmp_path: Path) -> None:
    write_yaml(tmp_path / "a.yaml", service("web"), endpoint_slice("web-1", "web"))
    (tmp_path / "b.json").write_text(json.dumps(node("node-a", zone="z1")), encoding="utf-8")
    write_yaml(
        tmp_path / "c.yml",
        {"apiVersion": "v1", "kind": "List", "items": [service("api", namespace="shop")]},
    )
    write_yaml(tmp_path / "ignored.txt", service("txt"))
    (tmp_path / "sub").mkdir()
    write_yaml(tmp_path / "sub" / "nested.yaml", service("nested"))

    state = load_manifests([tmp_path])

    assert set(state.services) == {key("web"), key("api", "shop")}
    assert state.services[key("api", "shop")].ports == (ServicePort("http", Protocol.TCP, 80),)
    assert set(state.slices) == {("default", "web-1")}
    assert state.slices[("default", "web-1")].service_key == key("web")
    assert state.nodes == {"node-a": Node("node-a", zone="z1")}


def test_load_explicit_files_any_suffix(tmp_path: Path) -> None:
    first = write_yaml(tmp_path / "one.manifest", service("one"))
    second = write_yaml(tmp_path / "two.yaml", service("two"))
    state = load_manifests([first, second])
    assert set(state.services) == {key("one"), key("two")}


def test_typed_list_items_without_kind(tmp_path: Path) -> None:
    items = [service("a"), endpoint_slice("a-1", "a")]
    for item in items:
        del item["kind"]
        del item["apiVersion"]
    write_yaml(
        tmp_path / "svc.yaml", {"apiVersion": "v1", "kind": "ServiceList", "items": items[:1]}
    )
    write_yaml(
        tmp_path / "eps.yaml",
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList", "items": items[1:]},
    )
    state = load_manifests([tmp_path])
    assert set(state.services) == {key("a")}
    assert set(state.slices) == {("default", "a-1")}


def test_other_kinds_empty_documents_and_fqdn_slices_are_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fqdn = endpoint_slice("web-fqdn", "web", addresses=("web.example.com",), address_type="FQDN")
    beta = endpoint_slice("web-beta", "web")
    beta["apiVersion"] = "discovery.k8s.io/v1beta1"
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}}
    write_text(
        tmp_path / "mixed.yaml",
        "---\n---\n"
        + yaml.safe_dump_all([deployment, fqdn, beta, service("web")])
        + "---\n# only a comment\n",
    )
    with caplog.at_level(logging.DEBUG, logger="userproxy.sources.manifests"):
        state = load_manifests([tmp_path])
    assert set(state.services) == {key("web")}
    assert state.slices == {}
    assert "Deployment" in caplog.text


def test_headless_and_external_name_services_are_kept(tmp_path: Path) -> None:
    external = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "ext"},
        "spec": {"type": "ExternalName", "externalName": "example.com"},
    }
    write_yaml(tmp_path / "s.yaml", service("headless", cluster_ip="None"), external)
    state = load_manifests([tmp_path])
    assert {s.name: s.is_proxied for s in state.services.values()} == {
        "headless": False,
        "ext": False,
    }


def test_unquoted_yaml_timestamp_stays_a_string(tmp_path: Path) -> None:
    write_text(
        tmp_path / "eps.yaml",
        """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
  annotations:
    endpoints.kubernetes.io/last-change-trigger-time: 2024-05-01T12:00:00Z
addressType: IPv4
endpoints: [{addresses: [10.1.0.1]}]
""",
    )
    state = load_manifests([tmp_path])
    assert state.slices[("default", "web-1")].trigger_time == 1714564800.0


@pytest.mark.parametrize(
    ("proxy_name", "services", "slices"),
    [
        (None, {"plain"}, {"plain-1"}),
        ("mine", {"mine"}, {"mine-1"}),
    ],
    ids=["default-proxy", "named-proxy"],
)
def test_label_selector(
    tmp_path: Path, proxy_name: str | None, services: set[str], slices: set[str]
) -> None:
    proxy_label = "service.kubernetes.io/service-proxy-name"
    write_yaml(
        tmp_path / "all.yaml",
        service("plain"),
        service("mine", labels={proxy_label: "mine"}),
        service("other", labels={proxy_label: "other"}),
        endpoint_slice("plain-1", "plain"),
        endpoint_slice("plain-2", "plain", labels={"service.kubernetes.io/headless": ""}),
        endpoint_slice("mine-1", "mine", labels={proxy_label: "mine"}),
        endpoint_slice("other-1", "other", labels={proxy_label: "other"}),
        node("node-a"),
    )
    state = load_manifests([tmp_path], proxy_name=proxy_name)
    assert {k.name for k in state.services} == services
    assert {name for _, name in state.slices} == slices
    assert set(state.nodes) == {"node-a"}  # Nodes are not filtered by the selector


# --------------------------------------------------------------------------- errors


def load_error(paths: list[Path]) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load_manifests(paths)
    return info.value


def test_error_names_file_document_object_and_field(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "web.yaml", service("a"), service("b"), service("web", port=70000))
    error = load_error([path])
    assert str(error) == (
        f"{path}: document 3: Service default/web: spec.ports[0].port: "
        "70000 is out of range 1..65535"
    )
    assert error.problems == (str(error),)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n   namespace: x\n",
            "line 5, column 13: YAML syntax error: mapping values are not allowed here",
        ),
        ("kind: Service\nmetadata: {name: [web\n", "YAML syntax error"),
        ("- just\n- a list\n", "document 1: expected a mapping"),
        ("apiVersion: v1\nmetadata: {name: web}\n", "document 1: kind: is required"),
        ("kind: Service\nmetadata: {name: web}\n", "document 1: apiVersion: is required"),
        (
            "apiVersion: v1\nkind: Service\nspec: {clusterIP: 10.0.0.1}\n",
            "document 1: Service default/<unnamed>: metadata.name: is required",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
            "spec: {ports: [{port: 80, protocol: HTTP}]}\n",
            "Service default/web: spec.ports[0].protocol: unknown protocol 'HTTP'",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: '80'}]}\n",
            "Service default/web: spec.ports[0].port: expected an integer, got string '80'",
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1}\n"
            "addressType: IPv4\n",
            "EndpointSlice default/web-1: metadata.labels['kubernetes.io/service-name']: "
            "is required",
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
            "metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\n"
            "addressType: IPv4\nendpoints: [{addresses: [10.0.0.1], conditions: {ready: 'yes'}}]\n",
            "endpoints[0].conditions.ready: expected a boolean, got string 'yes'",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
            "spec: {clusterIP: 10.0.0.256, ports: [{port: 80}]}\n",
            "spec.clusterIP: '10.0.0.256' is not a valid IP address",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
            "spec: {sessionAffinity: ClientIP, ports: [{port: 80}],\n"
            "  sessionAffinityConfig: {clientIP: {timeoutSeconds: 100000}}}\n",
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds: 100000 is out of range 1..86400",
        ),
        (
            "apiVersion: v1\nkind: Node\nmetadata: {name: n, labels: {"
            "topology.kubernetes.io/zone: 3}}\n",
            "Node n: metadata.labels['topology.kubernetes.io/zone']: expected a string",
        ),
    ],
    ids=[
        "yaml-indentation",
        "yaml-unclosed-flow",
        "not-a-mapping",
        "missing-kind",
        "missing-api-version",
        "missing-name",
        "unknown-protocol",
        "port-as-string",
        "slice-without-service-label",
        "condition-wrong-type",
        "bad-ip",
        "affinity-timeout-out-of-range",
        "node-label-not-string",
    ],
)
def test_single_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = write_text(tmp_path / "bad.yaml", text)
    error = load_error([path])
    assert len(error.problems) == 1
    assert str(error).startswith(f"{path}: ")
    assert expected in str(error)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write_text(tmp_path / "bad.yaml", "apiVersion: v1\nkind: Service\nmetadata: [\n")
    error = load_error([path])
    assert str(error).startswith(f"{path}: line ")
    assert "YAML syntax error" in str(error)


def test_json_syntax_error_names_line(tmp_path: Path) -> None:
    path = write_text(tmp_path / "bad.json", '{\n  "kind": "Service",\n  oops\n}\n')
    assert str(load_error([path])).startswith(f"{path}: line 3, column 3: JSON syntax error")


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert str(load_error([missing])) == f"{missing}: no such file or directory"


def test_duplicates_are_errors(tmp_path: Path) -> None:
    first = write_yaml(tmp_path / "a.yaml", service("web"), node("n"))
    second = write_yaml(
        tmp_path / "b.yaml",
        service("web"),
        service("web", namespace="other"),
        endpoint_slice("web", "web"),
        node("n"),
    )
    error = load_error([tmp_path])
    assert error.problems == (
        f"{second}: document 1: Service default/web: duplicate object "
        f"(first defined in {first}: document 1)",
        f"{second}: document 4: Node n: duplicate object (first defined in {first}: document 2)",
    )


def test_all_errors_are_collected(tmp_path: Path) -> None:
    a = write_yaml(
        tmp_path / "a.yaml",
        service("ok"),
        service("bad1", port=0),
        endpoint_slice("s", "ok", addresses=("not-an-ip",)),
    )
    b = write_text(tmp_path / "b.yaml", "kind: [\n")
    c = write_yaml(
        tmp_path / "c.yaml",
        {"apiVersion": "v1", "kind": "List", "items": [service("ok2"), service("bad2", port="x")]},
    )
    error = load_error([tmp_path])
    assert len(error.problems) == 4
    assert error.problems[0] == (
        f"{a}: document 2: Service default/bad1: spec.ports[0].port: 0 is out of range 1..65535"
    )
    assert error.problems[1] == (
        f"{a}: document 3: EndpointSlice default/s: endpoints[0].addresses[0]: "
        "'not-an-ip' is not a valid IP address"
    )
    assert error.problems[2].startswith(f"{b}: line ")
    assert error.problems[3] == (
        f"{c}: document 1, items[1]: Service default/bad2: spec.ports[0].port: "
        "expected an integer, got string 'x'"
    )
    text = str(error).splitlines()
    assert text[0] == "4 problems in the manifests:"
    assert [line.strip() for line in text[1:]] == list(error.problems)


# --------------------------------------------------------------------------- ManifestSource


class RecordingHandlers:
    """A Handlers implementation that records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.event = asyncio.Event()  # set on every call

    def on_service_add(self, service: Service) -> None:
        self.record(("service_add", service))

    def on_service_update(self, old: Service, new: Service) -> None:
        self.record(("service_update", old, new))

    def on_service_delete(self, service: Service) -> None:
        self.record(("service_delete", service))

    def on_services_synced(self) -> None:
        self.record(("services_synced",))

    def on_endpointslice_add(self, endpoint_slice: EndpointSlice) -> None:
        self.record(("endpointslice_add", endpoint_slice))

    def on_endpointslice_update(self, old: EndpointSlice, new: EndpointSlice) -> None:
        self.record(("endpointslice_update", old, new))

    def on_endpointslice_delete(self, endpoint_slice: EndpointSlice) -> None:
        self.record(("endpointslice_delete", endpoint_slice))

    def on_endpointslices_synced(self) -> None:
        self.record(("endpointslices_synced",))

    def on_node_add(self, node: Node) -> None:
        self.record(("node_add", node))

    def on_node_update(self, old: Node, new: Node) -> None:
        self.record(("node_update", old, new))

    def on_node_delete(self, node: Node) -> None:
        self.record(("node_delete", node))

    def on_node_synced(self) -> None:
        self.record(("node_synced",))

    def record(self, call: tuple[object, ...]) -> None:
        self.calls.append(call)
        self.event.set()

    def take(self) -> list[tuple[object, ...]]:
        calls, self.calls = self.calls, []
        return calls


async def wait_until(
    predicate: Callable[[], bool], event: asyncio.Event, within: float = 1.0
) -> None:
    """Wait until ``predicate()`` holds, re-checking whenever ``event`` is set.

    Fails after ``within`` seconds: a change must be seen within 1 s.
    """
    async with asyncio.timeout(within):
        while not predicate():
            event.clear()
            await event.wait()


class Fixture:
    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "manifests"
        self.dir.mkdir()
        write_yaml(self.dir / "web.yaml", service("web"), endpoint_slice("web-1", "web"))
        write_yaml(self.dir / "api.yaml", service("api", cluster_ip="10.96.0.2"))
        write_yaml(self.dir / "nodes.yaml", node("node-a", zone="z1"), node("node-b"))
        self.handlers = RecordingHandlers()
        self.errors: list[ManifestError] = []
        self.reloads = 0
        self.source = ManifestSource(
            [self.dir],
            self.handlers,
            node_name="node-a",
            on_reload_error=self._failed,
            on_reload=self._reloaded,
        )

    def _reloaded(self) -> None:
        self.reloads += 1
        self.handlers.event.set()

    def _failed(self, error: ManifestError) -> None:
        self.errors.append(error)
        self.handlers.event.set()

    async def wait(self, predicate: Callable[[], bool]) -> None:
        await wait_until(predicate, self.handlers.event)

    def state(self) -> ManifestState:
        state = self.source.state
        assert state is not None
        return state


@pytest.fixture
def fx(tmp_path: Path) -> Fixture:
    return Fixture(tmp_path)


@pytest.fixture
async def running(fx: Fixture) -> AsyncIterator[Fixture]:
    fx.source.initial_load()
    fx.handlers.take()
    task = asyncio.create_task(fx.source.run())
    yield fx
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_initial_load_delivers_everything_then_synced(fx: Fixture) -> None:
    state = fx.source.initial_load()
    web, api = state.services[key("web")], state.services[key("api")]
    assert fx.handlers.take() == [
        ("service_add", api),
        ("service_add", web),
        ("endpointslice_add", state.slices[("default", "web-1")]),
        ("node_add", Node("node-a", zone="z1")),
        ("services_synced",),
        ("endpointslices_synced",),
        ("node_synced",),
    ]
    assert fx.source.state is state


def test_initial_load_without_own_node(tmp_path: Path) -> None:
    write_yaml(tmp_path / "s.yaml", service("web"), node("elsewhere"))
    handlers = RecordingHandlers()
    ManifestSource([tmp_path], handlers, node_name="node-a").initial_load()
    assert [call[0] for call in handlers.calls] == [
        "service_add",
        "services_synced",
        "endpointslices_synced",
        "node_synced",
    ]


def test_initial_load_error_delivers_nothing(fx: Fixture) -> None:
    write_yaml(fx.dir / "bad.yaml", service("bad", port=70000))
    with pytest.raises(ManifestError, match=r"spec\.ports\[0\]\.port: 70000 is out of range"):
        fx.source.initial_load()
    assert fx.handlers.calls == []
    assert fx.source.state is None


async def test_edit_delivers_exactly_the_update(running: Fixture) -> None:
    fx = running
    old = fx.state().services[key("web")]
    write_yaml(fx.dir / "web.yaml", service("web", port=8080), endpoint_slice("web-1", "web"))
    await fx.wait(lambda: bool(fx.handlers.calls))
    new = fx.state().services[key("web")]
    assert new.ports == (ServicePort("http", Protocol.TCP, 8080),)
    await asyncio.sleep(0.5)  # nothing else follows (re-reads of a fresh file change nothing)
    assert fx.handlers.take() == [("service_update", old, new)]
    assert fx.reloads == 1
    assert fx.errors == []


async def test_same_size_edit_right_after_load_is_seen(running: Fixture) -> None:
    fx = running
    old = fx.state().slices[("default", "web-1")]
    size = (fx.dir / "web.yaml").stat().st_size
    write_yaml(
        fx.dir / "web.yaml", service("web"), endpoint_slice("web-1", "web", addresses=("10.1.0.2",))
    )
    assert (fx.dir / "web.yaml").stat().st_size == size
    await fx.wait(lambda: bool(fx.handlers.calls))
    new = fx.state().slices[("default", "web-1")]
    assert new.endpoints[0].address == "10.1.0.2"
    assert fx.handlers.take() == [("endpointslice_update", old, new)]


async def test_rewrite_with_equal_content_calls_nothing(running: Fixture) -> None:
    fx = running
    path = fx.dir / "api.yaml"
    write_text(path, path.read_text(encoding="utf-8") + "\n# a comment\n")
    await fx.wait(lambda: fx.reloads > 0)
    assert fx.handlers.calls == []


async def test_broken_edit_keeps_state_and_fix_applies(
    running: Fixture, caplog: pytest.LogCaptureFixture
) -> None:
    fx = running
    before = fx.state()
    path = fx.dir / "web.yaml"
    with caplog.at_level(logging.ERROR, logger="userproxy.sources.manifests"):
        write_text(path, "apiVersion: v1\nkind: [\n")
        await fx.wait(lambda: len(fx.errors) == 1)
        assert str(fx.errors[0]).startswith(f"{path}: line ")
        assert fx.handlers.calls == []
        assert fx.source.state is before

        # The same failure again (the file touched, not fixed) is reported but logged once.
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        await fx.wait(lambda: len(fx.errors) == 2)
        assert str(fx.errors[1]) == str(fx.errors[0])
        errors_logged = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors_logged) == 1
        assert str(path) in errors_logged[0].getMessage()

        # A different failure is logged again.
        write_yaml(path, service("web", port=0), endpoint_slice("web-1", "web"))
        await fx.wait(lambda: len(fx.errors) == 3)
        assert "spec.ports[0].port: 0 is out of range" in str(fx.errors[2])
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2

    assert fx.handlers.calls == []
    assert fx.source.state is before
    assert fx.reloads == 0

    write_yaml(path, service("web", port=81), endpoint_slice("web-1", "web"))
    await fx.wait(lambda: bool(fx.handlers.calls))
    await asyncio.sleep(0.3)
    new = fx.state().services[key("web")]
    assert fx.handlers.take() == [("service_update", before.services[key("web")], new)]
    assert new.ports[0].port == 81
    assert len(fx.errors) == 3


async def test_deleting_a_file_deletes_its_objects(running: Fixture) -> None:
    fx = running
    before = fx.state()
    (fx.dir / "web.yaml").unlink()
    await fx.wait(lambda: bool(fx.handlers.calls))
    assert fx.handlers.take() == [
        ("service_delete", before.services[key("web")]),
        ("endpointslice_delete", before.slices[("default", "web-1")]),
    ]
    assert set(fx.state().services) == {key("api")}


async def test_adding_a_file_adds_its_objects(running: Fixture) -> None:
    fx = running
    write_yaml(fx.dir / "new.json.yaml", service("new", cluster_ip="10.96.0.9"))
    write_text(fx.dir / "ignored.txt", "not a manifest")
    await fx.wait(lambda: bool(fx.handlers.calls))
    await asyncio.sleep(0.3)
    assert fx.handlers.take() == [("service_add", fx.state().services[key("new")])]


async def test_only_the_own_node_is_delivered(running: Fixture) -> None:
    fx = running
    path = fx.dir / "nodes.yaml"
    write_yaml(path, node("node-a", zone="z1"), node("node-b", zone="z9"), node("node-c"))
    await fx.wait(lambda: fx.reloads > 0)
    assert fx.handlers.calls == []  # other nodes changed, not ours

    write_yaml(path, node("node-a", zone="z2"), node("node-b"))
    await fx.wait(lambda: bool(fx.handlers.calls))
    assert fx.handlers.take() == [
        ("node_update", Node("node-a", zone="z1"), Node("node-a", zone="z2"))
    ]

    path.unlink()
    await fx.wait(lambda: bool(fx.handlers.calls))
    assert fx.handlers.take() == [("node_delete", Node("node-a", zone="z2"))]


async def test_run_loads_first_and_is_cancellable(fx: Fixture) -> None:
    task = asyncio.create_task(fx.source.run())
    await fx.wait(lambda: ("node_synced",) in fx.handlers.calls)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_run_raises_when_initial_load_fails(fx: Fixture) -> None:
    write_text(fx.dir / "bad.yaml", "kind: [\n")
    with pytest.raises(ManifestError):
        await fx.source.run()


def test_poll_interval_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="poll_interval"):
        ManifestSource([tmp_path], RecordingHandlers(), node_name="n", poll_interval=0)
