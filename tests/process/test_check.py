"""``userproxy check`` through the real command: exit status, report and warnings.

Like ``nginx -t``: valid manifests (warnings allowed) exit 0 and print what would be
served; invalid ones exit 2 naming file, document, object and field; nothing is bound.

Addresses: 127.0.82.x (no other test uses them); only the "binds nothing" test holds one.
"""

from __future__ import annotations

import socket
from pathlib import Path

from tests.process.test_cli import run_cli
from tests.support.manifest_cases import documents, node_yaml, service_yaml, slice_yaml

HTTP_8080 = "{name: http, protocol: TCP, port: 8080}"

GOOD = documents(
    node_yaml("n1"),
    service_yaml(
        "web", "127.0.82.1", "{name: http, protocol: TCP, port: 8080, nodePort: 30080}",
        type="NodePort",
    ),
    slice_yaml(
        "web-a", "web",
        endpoints="{addresses: [10.1.0.5], nodeName: n1}, "
        "{addresses: [10.1.0.6], conditions: {ready: false}}",
    ),
    service_yaml("db", "None", "{name: pg, port: 5432}"),
)  # fmt: skip

#: Valid, with one warning of each kind a file can show.
WITH_WARNINGS = documents(
    service_yaml("web", "127.0.82.2", HTTP_8080),
    slice_yaml("web-a", "web", kind="EndpointSlise"),
    "apiVersion: v1\nkind: Endpoints\nmetadata: {name: web, namespace: shop}\n",
    service_yaml("api", None, "{name: http, port: 80}"),
    slice_yaml("web-b", "web", port_name="htp", endpoints="{addresses: [10.1.0.7]}"),
    service_yaml("web2", "127.0.82.2", HTTP_8080),
)

BROKEN = documents(
    service_yaml("web", "127.0.82.3", HTTP_8080),
    service_yaml("bad", "127.0.82.4", "{name: http, protocol: TCP, port: 70000}"),
)


def test_valid_manifests_exit_0_and_print_what_would_be_served(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(GOOD)
    result = run_cli("check", "--manifests", str(manifest), "--hostname-override", "n1")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines == [
        "Service shop/db: not proxied (headless or no clusterIP)",
        "Service shop/web (NodePort)",
        "  port http/TCP",
        "    127.0.82.1:8080 (ClusterIP): 10.1.0.5:9376",
        "    <node IPv4 addresses>:30080 (NodePort): 10.1.0.5:9376",
        "own node n1: found",
        "userproxy check: valid: 1 Service served on 2 addresses, 1 not proxied, "
        "1 EndpointSlice, 0 warnings",
    ], result.stdout


def test_warnings_are_printed_and_still_exit_0(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(WITH_WARNINGS)
    result = run_cli("check", "--manifests", str(manifest))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "5 warnings:" in out, out
    for expected in (
        f"{manifest}: document 2: EndpointSlise shop/web-a: kind EndpointSlise is not read",
        f"{manifest}: document 3: Endpoints shop/web: not read",
        f"{manifest}: document 4: Service shop/api: has no spec.clusterIP",
        f"{manifest}: document 5: EndpointSlice shop/web-b: ports[0] htp/TCP matches no port",
        f"{manifest}: document 6: Service shop/web2: TCP 127.0.82.2:8080 (ClusterIP) is also",
    ):
        assert f"  {expected}" in out, (expected, out)
    assert out.splitlines()[-1].startswith("userproxy check: valid: ")


def test_invalid_manifests_exit_2_naming_file_document_object_and_field(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(BROKEN)
    result = run_cli("check", "--manifests", str(manifest))
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    message = f"{manifest}: document 2: Service shop/bad: spec.ports[0].port: 70000"
    assert message in result.stderr
    assert "invalid, nothing would be served" in result.stdout
    assert "Service shop/web" not in result.stdout  # no report of a half-valid state


def test_missing_path_and_missing_flag_exit_2(tmp_path: Path) -> None:
    result = run_cli("check", "--manifests", str(tmp_path / "nothing.yaml"))
    assert result.returncode == 2
    assert "nothing.yaml" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("check")
    assert result.returncode == 2
    assert "--manifests" in result.stderr


def test_config_file_settings_apply_and_its_api_source_is_replaced(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(GOOD)
    config = tmp_path / "config.yaml"
    config.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
        "kind: KubeProxyConfiguration\n"
        "hostnameOverride: n1\n"
        "clientConnection: {kubeconfig: /nonexistent/kubeconfig}\n"
        "nodePortAddresses: [10.0.0.0/8]\n"
    )
    result = run_cli("check", "--manifests", str(manifest), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "own node n1: found" in result.stdout
    assert "<node IPv4 addresses in 10.0.0.0/8>:30080 (NodePort)" in result.stdout

    config.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: Nonsense\n")
    result = run_cli("check", "--manifests", str(manifest), "--config", str(config))
    assert result.returncode == 2
    assert str(config) in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_default_balancer_in_the_config_file_is_an_error_as_in_run(
    tmp_path: Path,
) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(GOOD)
    config = tmp_path / "config.yaml"
    config.write_text(
        "apiVersion: userproxy.io/v1alpha1\nkind: UserProxyConfiguration\nbalancer: nope\n"
    )
    result = run_cli("check", "--manifests", str(manifest), "--config", str(config))
    assert result.returncode == 2, result.stdout
    assert "balancer" in result.stderr
    assert "nope" in result.stderr
    assert "Traceback" not in result.stderr
    config.write_text(
        "apiVersion: userproxy.io/v1alpha1\nkind: UserProxyConfiguration\nbalancer: maglev\n"
    )
    assert run_cli("check", "--manifests", str(manifest), "--config", str(config)).returncode == 0


def test_check_binds_nothing(tmp_path: Path) -> None:
    """The Service's address is held by another socket; check neither minds nor takes it."""
    manifest = tmp_path / "m.yaml"
    manifest.write_text(GOOD)
    with socket.socket() as holder:
        holder.bind(("127.0.82.1", 8080))
        holder.listen(1)
        result = run_cli("check", "--manifests", str(manifest), "--hostname-override", "n1")
    assert result.returncode == 0, result.stderr
    assert "127.0.82.1:8080 (ClusterIP)" in result.stdout
    assert result.stderr == ""
