"""``explain`` agrees with traffic: for each scenario, the endpoints real connections
through a running proxy reach equal explain's ``candidates``, and its text names the rule
that decided.

Each scenario writes one Service with name-answering backends (one EndpointSlice per
backend, so each has its own port), asks ``explain`` (the same code path as the command:
load_manifests, node_view, explain) and then connects through an in-process proxy serving
the same manifests, from the client address explained.

Addresses: 127.231.N.x (no other test uses them): .1 the ClusterIP, .2 the external or
load-balancer IP, .10+ the backends, .50+ the clients.  Port 8080 on the Service side.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.backends import Backend, ask, name_server
from tests.support.manifests import node, write
from tests.support.proxyrun import running_proxy
from userproxy.config import Settings
from userproxy.explain import Explanation, explain
from userproxy.explain_cli import node_view, render
from userproxy.sources.manifest_files import load_manifests

pytestmark = pytest.mark.both_loops

NODE = "test-node"
PORT = 8080


def _endpoint(backend: Backend, spec: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "addresses": [backend.ip],
        "conditions": spec.get("conditions", {"ready": True}),
        "nodeName": spec.get("node", "other-node"),
    }
    if "zone" in spec:
        entry["zone"] = spec["zone"]
    if "hints" in spec:
        entry["hints"] = {"forZones": [{"name": z} for z in spec["hints"]]}
    return entry


@contextlib.contextmanager
def scenario(
    tmp_path: Path, net: int, endpoints: Sequence[dict[str, Any]], **spec: Any
) -> Iterator[tuple[Path, dict[str, str]]]:
    """Backends named a, b, c... on 127.231.``net``.10+, a Service ``default/web`` with
    ``spec`` merged in; yields the manifest directory and {"ip:port": name}."""
    backends = [
        Backend(f"127.231.{net}.{10 + i}", name_server(chr(97 + i))) for i in range(len(endpoints))
    ]
    try:
        status = spec.pop("status", None)
        service: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "web",
                "namespace": "default",
                "annotations": spec.pop("annotations", {}),
            },
            "spec": {
                "clusterIP": f"127.231.{net}.1",
                "ports": [{"name": "tcp", "protocol": "TCP", "port": PORT, "targetPort": "tcp"}],
                **spec,
            },
        }
        if status is not None:
            service["status"] = status
        slices = [
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"web-{chr(97 + i)}",
                    "namespace": "default",
                    "labels": {"kubernetes.io/service-name": "web"},
                },
                "addressType": "IPv4",
                "ports": [{"name": "tcp", "protocol": "TCP", "port": b.port}],
                "endpoints": [_endpoint(b, e)],
            }
            for i, (b, e) in enumerate(zip(backends, endpoints, strict=True))
        ]
        manifests = tmp_path / "manifests"
        manifests.mkdir()
        write(manifests / "web.json", node(NODE, "z1"), service, *slices)
        yield manifests, {f"{b.ip}:{b.port}": chr(97 + i) for i, b in enumerate(backends)}
    finally:
        for backend in backends:
            backend.stop()


def explained(manifests: Path, client: str, to: str | None = None, **settings: Any) -> Explanation:
    config = Settings(hostname=NODE, manifests=(manifests,), **settings)
    local, nodeport = node_view(config, ("127.0.0.1",))
    state = load_manifests(config.manifests, config.service_proxy_name)
    return explain(
        state, config, "default/web:tcp", client, local=local, nodeport_addresses=nodeport, to=to
    )


def reached(
    address: tuple[str, int], clients: Sequence[str], per_client: int
) -> dict[str, set[str]]:
    """{client: the backend names its connections reached} ("REFUSED" for a refusal)."""
    seen: dict[str, set[str]] = {}
    for client in clients:
        for _ in range(per_client):
            try:
                name = ask(address, source=client, timeout=3) or "REFUSED"
            except (TimeoutError, ConnectionError):
                name = "REFUSED"
            seen.setdefault(client, set()).add(name)
    return seen


async def agrees(
    manifests: Path,
    names: dict[str, str],
    client: str,
    address: str,
    *,
    to: str | None = None,
    rule: str = "",
    clients: Sequence[str] = (),
    per_client: int = 12,
) -> Explanation:
    """Explain, then connect from ``client`` (and ``clients``) to ``address``; assert the
    names reached are exactly the candidates' and the text names ``rule``."""
    result = explained(manifests, client, to)
    text = "\n".join(render(result))
    assert rule in text, text
    want = {names[c] for c in result.candidates} or {"REFUSED"}
    ip, port = address.rsplit(":", 1)
    async with running_proxy(manifests):
        seen = await asyncio.to_thread(reached, (ip, int(port)), [client, *clients], per_client)
    got = set().union(*seen.values())
    assert got == want, f"reached {got}, explain said {want}\n{text}"
    return result


READY = {"ready": True}
TERMINATING = {"ready": False, "serving": True, "terminating": True}
NOT_READY = {"ready": False, "serving": False}


async def test_plain(tmp_path: Path) -> None:
    with scenario(tmp_path, 1, [{}, {}, {"conditions": NOT_READY}]) as (m, names):
        result = await agrees(
            m, names, "127.231.1.50", "127.231.1.1:8080", rule="[internalTrafficPolicy: Cluster]"
        )
    assert len(result.candidates) == 2
    assert [v.reason for v in result.endpoints if not v.in_pool] == ["not ready and not serving"]


async def test_terminating_fallback_used(tmp_path: Path) -> None:
    eps = [{"conditions": TERMINATING}, {"conditions": TERMINATING}, {"conditions": NOT_READY}]
    with scenario(tmp_path, 2, eps) as (m, names):
        result = await agrees(
            m, names, "127.231.2.50", "127.231.2.1:8080", rule="[terminating fallback: used]"
        )
    assert len(result.candidates) == 2


async def test_terminating_fallback_not_used(tmp_path: Path) -> None:
    with scenario(tmp_path, 3, [{}, {"conditions": TERMINATING}]) as (m, names):
        result = await agrees(
            m, names, "127.231.3.50", "127.231.3.1:8080", rule="[terminating fallback: not used]"
        )
    assert [names[c] for c in result.candidates] == ["a"]


async def test_internal_traffic_policy_local(tmp_path: Path) -> None:
    eps = [{"node": NODE}, {"node": "other-node"}, {"node": "other-node"}]
    with scenario(tmp_path, 4, eps, internalTrafficPolicy="Local") as (m, names):
        result = await agrees(
            m, names, "127.231.4.50", "127.231.4.1:8080", rule="[internalTrafficPolicy: Local]"
        )
    assert [names[c] for c in result.candidates] == ["a"]
    assert "not on this node" in result.endpoints[1].reason


async def test_external_traffic_policy_local_from_the_node(tmp_path: Path) -> None:
    eps = [{"node": NODE}, {"node": "other-node"}]
    spec = {"externalIPs": ["127.231.5.2"], "externalTrafficPolicy": "Local"}
    with scenario(tmp_path, 5, eps, **spec) as (m, names):
        result = await agrees(
            m,
            names,
            "127.231.5.50",
            "127.231.5.2:8080",
            to="127.231.5.2",
            rule="a client on the node gets the cluster-wide set",
        )
    assert len(result.candidates) == 2
    assert result.client_class == "node"
    # From outside (an address that is not the node's and not in a cluster CIDR) the same
    # Service gives only this node's endpoint: see test_external_traffic_policy_local_from_outside.
    outside = explained(m, "198.51.100.7", "127.231.5.2")
    assert outside.client_class == "external"
    assert [names[c] for c in outside.candidates] == ["a"]
    assert "[externalTrafficPolicy: Local] external traffic uses only this node's" in "\n".join(
        render(outside)
    )


async def test_topology_hints_used(tmp_path: Path) -> None:
    eps = [
        {"zone": "z1", "hints": ["z1"]},
        {"zone": "z2", "hints": ["z2"]},
        {"zone": "z1", "hints": ["z1"]},
    ]
    with scenario(tmp_path, 6, eps) as (m, names):
        result = await agrees(
            m, names, "127.231.6.50", "127.231.6.1:8080", rule="[topology hints: used]"
        )
    assert sorted(names[c] for c in result.candidates) == ["a", "c"]
    assert "topology hints" in result.endpoints[1].reason


async def test_topology_hints_ignored(tmp_path: Path) -> None:
    eps: list[dict[str, Any]] = [{"zone": "z1", "hints": ["z1"]}, {"zone": "z2"}]
    with scenario(tmp_path, 7, eps) as (m, names):
        result = await agrees(
            m,
            names,
            "127.231.7.50",
            "127.231.7.1:8080",
            rule="not every ready endpoint has zone hints",
        )
    assert len(result.candidates) == 2


async def test_affinity_and_maglev_pick(tmp_path: Path) -> None:
    spec = {
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
        "annotations": {"userproxy.io/balancer": "maglev"},
    }
    clients = [f"127.231.8.{n}" for n in range(50, 90)]
    with scenario(tmp_path, 8, [{}, {}, {}], **spec) as (m, names):
        result = await agrees(
            m,
            names,
            clients[0],
            "127.231.8.1:8080",
            clients=clients[1:],
            per_client=2,
            rule="timeout 60s",
        )
        picks = {c: explained(m, c).pick for c in clients}
        async with running_proxy(m):
            seen = await asyncio.to_thread(reached, ("127.231.8.1", PORT), clients, 3)
    assert result.affinity_timeout == 60
    # Each client is pinned to one endpoint: the one explain says maglev picks for it.
    assert seen == {c: {names[str(p)]} for c, p in picks.items()}


async def test_load_balancer_source_ranges(tmp_path: Path) -> None:
    spec = {
        "type": "LoadBalancer",
        "loadBalancerSourceRanges": ["127.231.9.64/26"],
        "status": {"loadBalancer": {"ingress": [{"ip": "127.231.9.2"}]}},
    }
    with scenario(tmp_path, 9, [{}, {}], **spec) as (m, names):
        allowed = await agrees(
            m,
            names,
            "127.231.9.70",
            "127.231.9.2:8080",
            to="127.231.9.2",
            rule="is in 127.231.9.64/26: allowed",
        )
        refused = await agrees(
            m,
            names,
            "127.231.9.50",
            "127.231.9.2:8080",
            to="127.231.9.2",
            rule="[loadBalancerSourceRanges] 127.231.9.50 is not in",
        )
    assert len(allowed.candidates) == 2
    assert refused.candidates == ()
