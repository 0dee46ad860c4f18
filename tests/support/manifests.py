"""Raw API objects (Service, EndpointSlice, Node) as the API server or a manifest file
holds them, the one builder of the tests; writing them to files for the proxy; fresh
127.x addresses. A test module with other defaults binds them once with
``functools.partial`` (tests/sources/test_kubernetes.py)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support.backends import Backend, echo

# Start at a per-process offset, so two test runs on one machine (a developer's and a
# helper's) rarely pick the same addresses; nets stay below 10 000 (127.100-149.x).
_next_net = itertools.count(1 + (os.getpid() % 40) * 200)


#: ``service(target_port=NAMED)``: the targetPort names the port (the default).
NAMED: Any = object()


def fresh_net() -> int:
    """A number for picking 127.x addresses no other test in this process uses."""
    return next(_next_net)


def fresh_ips() -> tuple[str, str]:
    """A Service IP (127.100-149.x.1) and a backend IP (127.150-199.x.1) of a fresh net."""
    net = fresh_net()
    return f"127.{net // 200 + 100}.{net % 200}.1", f"127.{net // 200 + 150}.{net % 200}.1"


def service(
    name: str,
    cluster_ip: str = "10.96.0.10",
    port: object = 80,
    *,
    namespace: str | None = "default",
    port_name: str = "tcp",
    target_port: object = NAMED,
    protocol: str | None = "TCP",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    affinity_timeout: int | None = None,
) -> dict[str, Any]:
    """A raw Service: one port ``port_name`` on ``port``, or one port per entry when
    ``port`` is a mapping of names to ports. Its ``targetPort`` is the port's name (the
    slices' port of that name), the value ``target_port`` or, with None, absent; a None
    namespace or protocol is left out, as a user may."""
    ports = port if isinstance(port, Mapping) else {port_name: port}
    entries = [
        _fields(
            ("name", key),
            ("protocol", protocol),
            ("port", number),
            ("targetPort", key if target_port is NAMED else target_port),
        )
        for key, number in ports.items()
    ]
    spec: dict[str, Any] = {"clusterIP": cluster_ip, "ports": entries}
    if affinity_timeout is not None:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout}}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _fields(
            ("name", name),
            ("namespace", namespace),
            ("labels", labels),
            ("annotations", annotations),
        ),
        "spec": spec,
    }


def endpoint_slice(
    name: str,
    service_name: str,
    port: object = 8080,
    addresses: Sequence[str] = ("10.1.0.1",),
    *,
    namespace: str | None = "default",
    port_name: str = "tcp",
    ready: Sequence[bool] | None = None,
    labels: dict[str, str] | None = None,
    address_type: str = "IPv4",
    endpoints: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A raw EndpointSlice of ``service_name``: its port (or, as for ``service``, a
    mapping of ports) for every address, each ready unless ``ready`` says otherwise; or,
    given ``endpoints``, those raw endpoints as they are (conditions, node, zone...)."""
    ports = port if isinstance(port, Mapping) else {port_name: port}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": _fields(
            ("name", name),
            ("namespace", namespace),
            ("labels", {"kubernetes.io/service-name": service_name, **(labels or {})}),
        ),
        "addressType": address_type,
        "ports": [
            {"name": key, "protocol": "TCP", "port": number} for key, number in ports.items()
        ],
        "endpoints": list(endpoints)
        if endpoints is not None
        else [
            {"addresses": [address], "conditions": {"ready": ready[i] if ready else True}}
            for i, address in enumerate(addresses)
        ],
    }


def node(name: str, zone: str | None = None) -> dict[str, Any]:
    """A raw Node, with its topology zone label when ``zone`` is given."""
    labels = {"topology.kubernetes.io/zone": zone} if zone else {}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def _fields(*pairs: tuple[str, object]) -> dict[str, Any]:
    """A mapping of the ``pairs`` whose value is not None."""
    return {key: value for key, value in pairs if value is not None}


def write(path: Path, *objects: dict[str, Any]) -> None:
    """Write ``objects`` as a JSON List, atomically (readers never see half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))
    tmp.replace(path)


@contextlib.contextmanager
def echo_service(
    tmp_path: Path, service_ip: str, backend_ip: str, port: int = 8080
) -> Iterator[tuple[tuple[str, int], Path]]:
    """An echo backend on ``backend_ip`` behind a Service at ``service_ip:port``, written
    to ``tmp_path/manifests``; yields the Service address and the manifest directory."""
    backend = Backend(backend_ip, echo)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    write(
        manifests / "echo.json",
        service("echo", service_ip, port),
        endpoint_slice("echo-a", "echo", backend.port, [backend.ip]),
    )
    try:
        yield (service_ip, port), manifests
    finally:
        backend.stop()
