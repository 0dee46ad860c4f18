"""Acceptance: every kind of service address reached across real network namespaces.

A "client" namespace reaches a "node" namespace over a veth pair; userproxy runs in the
node namespace with ``--manage-addresses``, so the ClusterIPs, externalIPs and
load-balancer IPs it serves become local there (on ``userproxy0``) and the client's route
for 198.19.0.0/16 via the node delivers them.  See ``harness.py`` for the layout.

Each test uses its own Service addresses and ports:

* ClusterIPs 198.19.0.1x, externalIPs 198.19.1.1x, LB IPs 198.19.2.1x (x = test number);
* NodePorts 3008x on the node's veth address 198.18.0.1; health-check port 32100.

Backends ``local-1`` (nodeName node-a, the proxy's own node) and ``remote-1`` (node-b)
both run in the node namespace; see ``harness.BACKENDS``.
"""

from __future__ import annotations

import json

from tests.netns.harness import (
    CLIENT_IP,
    NODE_IP,
    OTHER_CLIENT_IP,
    REFUSED,
    RESET,
    TIMEOUT,
    UNREACHABLE,
    Agent,
    Lab,
    ManifestFile,
    endpoint_slice,
    eventually,
    service,
)

BACKEND_NAMES = {"local-1", "remote-1"}
#: A connection turned away "at once" must be turned away faster than this.
AT_ONCE = 1.0


def answers(agent: Agent, host: str, port: int, tries: int) -> list[str]:
    """``tries`` new connections: who answered each (bounded: 2 s each)."""
    return [agent.connect(host, port, timeout=2.0) for _ in range(tries)]


def wait_answer(
    agent: Agent, host: str, port: int, accept: set[str], *, within: float = 5.0
) -> str:
    """Connect until the answer is one of ``accept`` (the proxy applies changes async)."""
    return eventually(
        lambda: agent.connect(host, port, timeout=1.0),
        lambda result: result in accept,
        within=within,
        what=f"{host}:{port} from {agent.netns} to answer one of {sorted(accept)}",
    )


def wait_device(lab: Lab, present: set[str], absent: frozenset[str] = frozenset()) -> set[str]:
    return eventually(
        lab.device_addresses,
        lambda held: present <= held and not (absent & held),
        what=f"userproxy0 to hold {sorted(present)} and none of {sorted(absent)}",
    )


def refused_source_range(metrics: str, service_name: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if (
            line.startswith("userproxy_connections_refused_total{")
            and 'reason="source_range"' in line
            and service_name in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_every_address_kind_reaches_backends(lab: Lab, manifest: ManifestFile) -> None:
    cluster_ip, external_ip, lb_ip, node_port = "198.19.0.10", "198.19.1.10", "198.19.2.10", 30080
    manifest.write(
        service(
            "kinds",
            cluster_ip,
            type="LoadBalancer",
            node_port=node_port,
            external_ips=[external_ip],
            lb_ips=[lb_ip],
        ),
        endpoint_slice("kinds", ["local-1", "remote-1"]),
    )
    wait_device(lab, {cluster_ip, external_ip, lb_ip})
    targets = [(cluster_ip, 80), (NODE_IP, node_port), (external_ip, 80), (lb_ip, 80)]
    for host, port in targets:
        wait_answer(lab.client, host, port, BACKEND_NAMES)
        seen = answers(lab.client, host, port, 4)
        assert set(seen) == BACKEND_NAMES, f"{host}:{port} from the client: {seen}"

    manifest.write()  # the Service is deleted
    held = wait_device(lab, set(), frozenset({cluster_ip, external_ip, lb_ip}))
    assert not held & {cluster_ip, external_ip, lb_ip}
    # The NodePort address stays on the node: the kernel refuses.  The service IPs are not
    # local any more: the node (no forwarding) answers host unreachable, or stays silent.
    assert lab.client.connect(NODE_IP, node_port) == REFUSED
    for host in (cluster_ip, external_ip, lb_ip):
        result = lab.client.connect(host, 80, timeout=0.5)
        assert result in {REFUSED, UNREACHABLE, TIMEOUT}, f"{host}:80 after deletion: {result}"


def test_external_traffic_policy_local(lab: Lab, manifest: ManifestFile) -> None:
    cluster_ip, node_port = "198.19.0.11", 30081

    def write(backends: list[str]) -> None:
        manifest.write(
            service(
                "etp-local",
                cluster_ip,
                type="NodePort",
                node_port=node_port,
                external_policy="Local",
            ),
            endpoint_slice("etp-local", backends),
        )

    write(["local-1", "remote-1"])
    wait_answer(lab.client, NODE_IP, node_port, BACKEND_NAMES)
    # From outside the node: only the local endpoint.
    assert set(answers(lab.client, NODE_IP, node_port, 20)) == {"local-1"}
    # From the node itself (source 198.18.0.1, a node address): the cluster-wide set.
    assert set(answers(lab.node, NODE_IP, node_port, 6)) == BACKEND_NAMES
    # The ClusterIP is not subject to the external policy.
    assert set(answers(lab.client, cluster_ip, 80, 6)) == BACKEND_NAMES

    write(["remote-1"])  # the local endpoint goes away
    wait_answer(lab.client, NODE_IP, node_port, {REFUSED, RESET})
    for _ in range(5):
        result, elapsed = lab.client.connect_timed(NODE_IP, node_port)
        assert result in {REFUSED, RESET}, f"no local endpoint, from outside: {result}"
        assert elapsed < AT_ONCE, f"turned away only after {elapsed:.2f}s"
    assert set(answers(lab.node, NODE_IP, node_port, 4)) == {"remote-1"}
    assert set(answers(lab.client, cluster_ip, 80, 4)) == {"remote-1"}


def test_internal_traffic_policy_local(lab: Lab, manifest: ManifestFile) -> None:
    cluster_ip = "198.19.0.12"

    def write(backends: list[str]) -> None:
        manifest.write(
            service("itp-local", cluster_ip, internal_policy="Local"),
            endpoint_slice("itp-local", backends),
        )

    write(["local-1", "remote-1"])
    wait_device(lab, {cluster_ip})
    wait_answer(lab.client, cluster_ip, 80, BACKEND_NAMES)
    assert set(answers(lab.client, cluster_ip, 80, 20)) == {"local-1"}

    write(["remote-1"])
    # A ClusterIP listener has one traffic class: with no local endpoint its socket closes,
    # and the kernel refuses (the address stays: the Service still exists).
    wait_answer(lab.client, cluster_ip, 80, {REFUSED, RESET})
    for _ in range(5):
        result, elapsed = lab.client.connect_timed(cluster_ip, 80)
        assert result == REFUSED, f"iTP Local without local endpoints: {result}"
        assert elapsed < AT_ONCE
    assert cluster_ip in lab.device_addresses()

    write(["local-1", "remote-1"])
    wait_answer(lab.client, cluster_ip, 80, {"local-1"})


def test_load_balancer_source_ranges(lab: Lab, manifest: ManifestFile) -> None:
    cluster_ip, lb_ip = "198.19.0.13", "198.19.2.13"
    manifest.write(
        service(
            "ranges",
            cluster_ip,
            type="LoadBalancer",
            lb_ips=[lb_ip],
            source_ranges=[f"{CLIENT_IP}/32"],
        ),
        endpoint_slice("ranges", ["local-1"]),
    )
    wait_device(lab, {cluster_ip, lb_ip})
    allowed = eventually(
        lambda: lab.client.connect(lb_ip, 80, source=CLIENT_IP, timeout=1.0),
        lambda result: result == "local-1",
        what="the allowed source to be answered",
    )
    assert allowed == "local-1"
    before = refused_source_range(lab.metrics(), "default/ranges")
    for _ in range(3):
        result, elapsed = lab.client.connect_timed(lb_ip, 80, source=OTHER_CLIENT_IP)
        assert result in {RESET, REFUSED}, f"denied source got {result}"
        assert elapsed < AT_ONCE, f"denied source turned away only after {elapsed:.2f}s"
    assert lab.client.connect(lb_ip, 80, source=CLIENT_IP) == "local-1"
    # The ranges restrict the load-balancer IP only, not the ClusterIP.
    assert lab.client.connect(cluster_ip, 80, source=OTHER_CLIENT_IP) == "local-1"
    after = eventually(
        lambda: refused_source_range(lab.metrics(), "default/ranges"),
        lambda count: count >= before + 3,
        what='userproxy_connections_refused_total{reason="source_range"} to count 3 more',
    )
    assert after >= 3


def test_health_check_node_port_follows_local_endpoints(lab: Lab, manifest: ManifestFile) -> None:
    cluster_ip, lb_ip, node_port, check_port = "198.19.0.14", "198.19.2.14", 30084, 32100

    def write(backends: list[str]) -> None:
        manifest.write(
            service(
                "health",
                cluster_ip,
                type="LoadBalancer",
                node_port=node_port,
                lb_ips=[lb_ip],
                external_policy="Local",
                health_check_node_port=check_port,
            ),
            endpoint_slice("health", backends),
        )

    def probe() -> tuple[int | None, int | None]:
        answer = lab.client.http(NODE_IP, check_port)
        if answer.get("result") != "http":
            return None, None
        body = json.loads(answer["body"])
        assert body["service"] == {"namespace": "default", "name": "health"}
        return answer["status"], body["localEndpoints"]

    write(["local-1", "remote-1"])
    eventually(probe, lambda got: got == (200, 1), what="200 with one local endpoint")
    assert lab.client.connect(lb_ip, 80) == "local-1"

    write(["remote-1"])
    eventually(probe, lambda got: got == (503, 0), what="503 without local endpoints")
    assert lab.client.connect(lb_ip, 80) in {RESET, REFUSED}

    write(["local-1", "remote-1"])
    eventually(probe, lambda got: got == (200, 1), what="200 again once the endpoint is back")
    assert lab.client.connect(lb_ip, 80, timeout=2.0) == "local-1"


def test_type_changes_keep_long_lived_connection(lab: Lab, manifest: ManifestFile) -> None:
    cluster_ip, lb_ip, node_port = "198.19.0.15", "198.19.2.15", 30085
    slice_ = endpoint_slice("retype", ["local-1"])
    line = iter(range(100))

    def held_answers() -> None:
        text = f"still-there-{next(line)}"
        answer = lab.client.call("send", id="long", line=text)
        assert answer["result"] == text, f"the long-lived connection: {answer}"

    manifest.write(service("retype", cluster_ip), slice_)
    wait_device(lab, {cluster_ip})
    wait_answer(lab.client, cluster_ip, 80, {"local-1"})
    assert lab.client.call("hold", id="long", host=cluster_ip, port=80)["result"] == "local-1"
    try:
        held_answers()
        assert lab.client.connect(NODE_IP, node_port) == REFUSED

        manifest.write(service("retype", cluster_ip, type="NodePort", node_port=node_port), slice_)
        wait_answer(lab.client, NODE_IP, node_port, {"local-1"})
        held_answers()

        manifest.write(
            service("retype", cluster_ip, type="LoadBalancer", node_port=node_port, lb_ips=[lb_ip]),
            slice_,
        )
        wait_device(lab, {cluster_ip, lb_ip})
        wait_answer(lab.client, lb_ip, 80, {"local-1"})
        assert lab.client.connect(NODE_IP, node_port) == "local-1"
        held_answers()

        # Back to ClusterIP (the API server drops the nodePort and the LB status with it).
        manifest.write(service("retype", cluster_ip), slice_)
        wait_device(lab, {cluster_ip}, frozenset({lb_ip}))
        wait_answer(lab.client, NODE_IP, node_port, {REFUSED})
        result = lab.client.connect(lb_ip, 80, timeout=0.5)
        assert result in {REFUSED, UNREACHABLE, TIMEOUT}, f"LB IP after ClusterIP: {result}"
        held_answers()
        assert lab.client.connect(cluster_ip, 80) == "local-1"
        held_answers()
    finally:
        lab.client.call("drop", id="long")
