"""``userproxy explain`` through the real command: text, ``-o json``, exit status 2 for a
Service, port or address that does not exist (listing what does).  Binds nothing; the
node's addresses are given with ``--node-address`` so the result does not depend on the
host.  Addresses are documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24)
and 10.x: nothing is connected to.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.process.test_cli import run_cli

MANIFESTS = """\
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.5
  externalTrafficPolicy: Local
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: 192.0.2.9}, {ip: 192.0.2.10, ipMode: Proxy}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.1.0.5], nodeName: n1, zone: z1}
- {addresses: [10.1.0.6], nodeName: n2, zone: z2}
- addresses: [10.1.0.7]
  nodeName: n1
  conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
"""


def _explain(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFESTS)
    result = run_cli(
        "explain", *args, "--manifests", str(manifest), "--node", "n1",
        "--node-address", "192.168.1.5",
    )  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout, result.stderr


def test_external_client_under_external_traffic_policy_local(tmp_path: Path) -> None:
    status, out, err = _explain(tmp_path, "shop/web", "--from", "203.0.113.4")
    assert status == 0, err
    assert "203.0.113.4 is neither a node address" in out
    assert "[address] 192.168.1.5:30080 (NodePort)" in out  # the first external address
    assert "[externalTrafficPolicy: Local] external traffic uses only this node's" in out
    assert "192.0.2.10 ipMode Proxy: not served here" in out
    assert "- 10.1.0.6:8080: not on this node (n1) and the traffic policy is Local" in out
    assert "- 10.1.0.7:8080: terminating: the fallback is not used" in out
    assert out.rstrip().endswith("candidates: 10.1.0.5:8080")


def test_json_from_the_node_has_the_candidates_per_address(tmp_path: Path) -> None:
    status, out, err = _explain(tmp_path, "shop/web:http", "--from", "192.168.1.5", "-o", "json")
    assert status == 0, err
    data = json.loads(out)
    assert data["client_class"] == "node"
    assert data["address"] == "10.96.0.5:80"
    assert data["candidates"] == ["10.1.0.5:8080", "10.1.0.6:8080"]
    by_address = {entry["address"]: entry for entry in data["listeners"]}
    assert set(by_address) == {"10.96.0.5:80", "192.168.1.5:30080", "192.0.2.9:80"}
    # From the node, a Local external policy still gives the cluster-wide set.
    assert by_address["192.0.2.9:80"]["candidates"] == ["10.1.0.5:8080", "10.1.0.6:8080"]
    assert [e["in_pool"] for e in data["endpoints"]] == [True, True, False]
    assert {s["rule"] for s in data["steps"]} >= {"traffic class", "balancer", "sessionAffinity"}


def test_to_picks_the_address(tmp_path: Path) -> None:
    status, out, err = _explain(
        tmp_path, "shop/web", "--from", "203.0.113.4", "--to", "192.0.2.9:80", "-o", "json"
    )
    assert status == 0, err
    data = json.loads(out)
    assert (data["address"], data["candidates"]) == ("192.0.2.9:80", ["10.1.0.5:8080"])


def test_unknown_service_exits_2_listing_the_services(tmp_path: Path) -> None:
    status, out, err = _explain(tmp_path, "shop/nope")
    assert status == 2
    assert out == ""
    assert "no Service shop/nope" in err
    assert "kube-system/dns:dns,dns-tcp" in err
    assert "shop/web:http" in err


def test_unknown_or_ambiguous_port_exits_2_listing_the_ports(tmp_path: Path) -> None:
    status, _, err = _explain(tmp_path, "shop/web:https")
    assert status == 2
    assert "Service shop/web has no port 'https'; its ports: http" in err
    status, _, err = _explain(tmp_path, "kube-system/dns")
    assert status == 2
    assert "several ports; name one; its ports: dns,dns-tcp" in err


def test_unknown_address_exits_2_listing_the_addresses(tmp_path: Path) -> None:
    status, _, err = _explain(tmp_path, "shop/web", "--to", "192.0.2.99")
    assert status == 2
    assert "10.96.0.5:80, 192.168.1.5:30080, 192.0.2.9:80" in err


def test_cluster_cidr_makes_a_pod_client_node_local(tmp_path: Path) -> None:
    status, out, err = _explain(
        tmp_path, "shop/web", "--from", "10.244.1.7", "--cluster-cidr", "10.244.0.0/16",
        "--to", "192.168.1.5", "-o", "json",
    )  # fmt: skip
    assert status == 0, err
    data = json.loads(out)
    assert data["client_class"] == "node"
    assert data["candidates"] == ["10.1.0.5:8080", "10.1.0.6:8080"]


def test_bad_client_address_exits_2(tmp_path: Path) -> None:
    status, out, err = _explain(tmp_path, "shop/web", "--from", "nope")
    assert (status, out) == (2, "")
    assert "--from 'nope': not an IP address" in err
