"""``explain`` agrees with traffic from a real outside client (the netns lab).

Every 127.x client is on the node for a proxy on this machine, so an external client under
``externalTrafficPolicy: Local`` needs another network namespace: the lab's client
namespace (see ``harness.py``).  The test asks ``explain`` about the manifests the lab's
proxy serves, from the client's address and from the node's, and checks that real
connections from each reach exactly the ``candidates``.

Addresses: ClusterIP 198.19.0.95, NodePort 30095 on the node's 198.18.0.1 (no other test
uses them).
"""

from __future__ import annotations

from tests.netns.harness import (
    BACKENDS,
    CLIENT_IP,
    NODE_IP,
    NODE_NAME,
    Lab,
    ManifestFile,
    endpoint_slice,
    eventually,
    service,
)
from userproxy.config import Settings
from userproxy.explain import Explanation, explain
from userproxy.explain_cli import node_view, render
from userproxy.sources.manifest_files import load_manifests

NAMES = {f"{ip}:9000": name for name, (ip, _) in BACKENDS.items()}


def explained(lab: Lab, client: str, to: str) -> Explanation:
    settings = Settings(hostname=NODE_NAME, manifests=(lab.manifests,))
    local, nodeport = node_view(settings, (NODE_IP,))
    state = load_manifests(settings.manifests, settings.service_proxy_name)
    return explain(
        state, settings, "default/etp:tcp", client, local=local, nodeport_addresses=nodeport, to=to
    )


def test_external_traffic_policy_local_from_outside_and_from_the_node(
    lab: Lab, manifest: ManifestFile
) -> None:
    node_port = 30095
    manifest.write(
        service("etp", "198.19.0.95", type="NodePort", node_port=node_port,
                external_policy="Local"),
        endpoint_slice("etp", ["local-1", "remote-1"]),
    )  # fmt: skip
    both = set(BACKENDS)
    eventually(
        lambda: {lab.node.connect(NODE_IP, node_port, timeout=1.0) for _ in range(4)},
        lambda seen: seen == both,
        what="the NodePort to serve both backends from the node",
    )

    outside = explained(lab, CLIENT_IP, f"{NODE_IP}:{node_port}")
    text = "\n".join(render(outside))
    assert outside.client_class == "external", text
    assert "[externalTrafficPolicy: Local] external traffic uses only this node's" in text
    want = {NAMES[c] for c in outside.candidates}
    assert want == {"local-1"}, text
    got = {lab.client.connect(NODE_IP, node_port, timeout=2.0) for _ in range(12)}
    assert got == want, text

    on_node = explained(lab, NODE_IP, f"{NODE_IP}:{node_port}")
    text = "\n".join(render(on_node))
    assert on_node.client_class == "node", text
    assert "a client on the node gets the cluster-wide set" in text
    want = {NAMES[c] for c in on_node.candidates}
    assert want == both, text
    got = {lab.node.connect(NODE_IP, node_port, timeout=2.0) for _ in range(12)}
    assert got == want, text
