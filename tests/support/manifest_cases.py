"""What the manifest tests share: object builders, YAML text, hostile files, a recorder and
a running ManifestSource.

Two kinds of builder: ``service``/``endpoint_slice``/``node`` give dicts (written with
``write_yaml``), the ``*_yaml`` functions give YAML text, for tests that assert on
document numbers or write files no dict could give.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import yaml

from tests.support.proxyrun import eventually
from userproxy.model import EndpointSlice, Node, Service, ServiceKey
from userproxy.sources.manifests import (
    ManifestError,
    ManifestSource,
    ManifestState,
    load_manifests,
)

# --------------------------------------------------------------------------- objects as dicts


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


def key(name: str, namespace: str = "default") -> ServiceKey:
    return ServiceKey(namespace, name)


# --------------------------------------------------------------------------- objects as YAML

#: The one port of most Services below.
HTTP_80 = "{name: http, protocol: TCP, port: 80}"


def service_yaml(
    name: str | None,
    cluster_ip: str | None,
    ports: str = HTTP_80,
    *,
    namespace: str | None = "shop",
    type: str | None = None,
) -> str:
    """A Service document; ``ports`` is the flow list's inside, None leaves a field out."""
    metadata = [f"name: {name}"] if name is not None else []
    metadata += [f"namespace: {namespace}"] if namespace is not None else []
    lines = ["apiVersion: v1", "kind: Service", f"metadata: {{{', '.join(metadata)}}}", "spec:"]
    lines += [f"  type: {type}"] if type is not None else []
    lines += [f"  clusterIP: {cluster_ip}"] if cluster_ip is not None else []
    return "\n".join([*lines, f"  ports: [{ports}]", ""])


def slice_yaml(
    name: str,
    service: str | None,
    *,
    port_name: str = "http",
    port: int = 9376,
    endpoints: str = "{addresses: [10.1.0.5]}",
    kind: str = "EndpointSlice",
    api_version: str = "discovery.k8s.io/v1",
    namespace: str | None = "shop",
) -> str:
    """An EndpointSlice document of ``service`` (None: without the label naming it)."""
    metadata = [f"name: {name}"]
    metadata += [f"namespace: {namespace}"] if namespace is not None else []
    if service is not None:
        metadata.append(f"labels: {{kubernetes.io/service-name: {service}}}")
    return (
        f"apiVersion: {api_version}\nkind: {kind}\nmetadata: {{{', '.join(metadata)}}}\n"
        f"addressType: IPv4\nports: [{{name: {port_name}, protocol: TCP, port: {port}}}]\n"
        f"endpoints: [{endpoints}]\n"
    )


def node_yaml(name: str) -> str:
    return f"apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n"


def documents(*docs: str) -> str:
    return "---\n".join(docs)


# --------------------------------------------------------------------------- files


def write_yaml(path: Path, *documents: object) -> Path:
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False), encoding="utf-8")
    return path


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_bad(path: Path, content: str) -> Path:
    """Write ``content`` as is, lone surrogates as the bytes they stand for (not UTF-8)."""
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    return path


def age(*paths: Path, seconds: float = 5.0) -> None:
    """Backdate files so their stat is trusted (files modified within 1 s are re-read)."""
    then = time.time() - seconds
    for path in paths:
        os.utime(path, (then, then))


def load_error(paths: list[Path]) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load_manifests(paths)
    return info.value


def _service_with_port(port: str) -> str:
    return (
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
        f"spec: {{ports: [{{port: {port}}}]}}\n"
    )


def _json_service_with_port(port: str) -> str:
    return (
        '{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, '
        f'"spec": {{"ports": [{{"port": {port}}}]}}}}'
    )


_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]\n" for a, b in zip("abcdefg", "bcdefgh", strict=True)
)

#: Hostile files, id: (file name, content, what the message says after the file name).
BAD: dict[str, tuple[str, str, str]] = {
    "yaml-flow-nested-5000": ("web.yaml", "a: " + "[" * 5000 + "]" * 5000, "nested more than 200"),
    "yaml-block-nested-5000": ("web.yaml", "- " * 5000 + "x\n", "nested more than 200 levels"),
    "yaml-mappings-nested-1000": (  # 5000 levels would be 25 MB: over the size limit
        "web.yaml",
        "".join(f"{'  ' * i}k:\n" for i in range(1000)),
        "nested more than 200 levels",
    ),
    "json-nested-100000": ("web.json", "[" * 100_000 + "]" * 100_000, "nested more than 200"),
    "json-objects-nested-100000": (
        "web.json",
        '{"a": ' * 100_000 + "1" + "}" * 100_000,
        "nested more than 200",
    ),
    "yaml-int-5000-digits": (
        "web.yaml",
        _service_with_port("9" * 5000),
        "integer of 5000 characters (at most 64",
    ),
    "yaml-hex-int-5000-digits": (
        "web.yaml",
        _service_with_port("0x" + "f" * 4998),
        "integer of 5000 characters",
    ),
    "json-int-5000-digits": (
        "web.json",
        _json_service_with_port("9" * 5000),
        "integer of 5000 characters",
    ),
    "yaml-empty-binary-int": ("web.yaml", _service_with_port("0b_"), "cannot parse: ValueError"),
    "yaml-empty-float": ("web.yaml", "a: !!float ._\n", "cannot parse: ValueError"),
    "yaml-alias-bomb": ("web.yaml", _LAUGHS, "more than 4000000 nodes"),
    "yaml-recursive-alias": ("web.yaml", "a: &a [1, *a]\n", "alias *a refers to a node that"),
    "yaml-undefined-alias": ("web.yaml", "a: *nope\n", "found undefined alias *nope"),
    "yaml-python-tag": ("web.yaml", "a: !!python/object:os.system x\n", "YAML syntax error"),
    "not-utf8": ("web.yaml", "kind: Service\nmetadata: {name: \udcff}\n", "not UTF-8"),
}

# --------------------------------------------------------------------------- a running source


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
    """A directory of three manifests (web, api, nodes) and a ManifestSource over it that
    records its handler calls, reload errors and reloads."""

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

    async def polled(self, count: int = 2) -> None:
        """Wait for ``count`` more polls: what has not happened by then is not coming (a
        freshly written file is polled every 0.2 s, so this is quick)."""
        polls = self.source.polls + count
        await eventually(lambda: self.source.polls >= polls, within=10, what=f"{count} polls")

    def state(self) -> ManifestState:
        state = self.source.state
        assert state is not None
        return state

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Fixture]:
        """The source loaded (its first calls taken) and running until the block ends."""
        self.source.initial_load()
        self.handlers.take()
        task = asyncio.create_task(self.source.run())
        yield self
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
