"""Builders for Service and EndpointSlice manifests written to files for the proxy."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.support.backends import Backend, echo

# Start at a per-process offset, so two test runs on one machine (a developer's and a
# helper's) rarely pick the same addresses; nets stay below 10 000 (127.100-149.x).
_next_net = itertools.count(1 + (os.getpid() % 40) * 200)


def fresh_net() -> int:
    """A number for picking 127.x addresses no other test in this process uses."""
    return next(_next_net)


def fresh_ips() -> tuple[str, str]:
    """A Service IP (127.100-149.x.1) and a backend IP (127.150-199.x.1) of a fresh net."""
    net = fresh_net()
    return f"127.{net // 200 + 100}.{net % 200}.1", f"127.{net // 200 + 150}.{net % 200}.1"


def service(
    name: str,
    cluster_ip: str,
    port: int,
    *,
    namespace: str = "default",
    port_name: str = "tcp",
    affinity_timeout: int | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "clusterIP": cluster_ip,
        "ports": [{"name": port_name, "protocol": "TCP", "port": port, "targetPort": port_name}],
    }
    if affinity_timeout is not None:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout}}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations or {}},
        "spec": spec,
    }


def endpoint_slice(
    name: str,
    service_name: str,
    port: int,
    addresses: Sequence[str],
    *,
    namespace: str = "default",
    port_name: str = "tcp",
    ready: Sequence[bool] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "ports": [{"name": port_name, "protocol": "TCP", "port": port}],
        "endpoints": [
            {"addresses": [address], "conditions": {"ready": ready[i] if ready else True}}
            for i, address in enumerate(addresses)
        ],
    }


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
