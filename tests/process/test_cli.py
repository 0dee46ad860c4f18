"""The ``userproxy`` command as a subprocess: exit status, messages, shutdown, log format.

Addresses: the Services here listen on 127.0.80.x and their backends on 127.0.81.x (no other
test uses them).
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.support.backends import recv_all
from tests.support.manifests import echo_service as manifests_echo_service
from tests.support.proxyrun import proxy_process, wait_listening

SERVICE_PORT = 8080


def run_cli(
    *args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m userproxy ARGS`` to completion (bounded: 30 s)."""
    command = [sys.executable, "-m", "userproxy", *args]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=30, check=False
    )


# --------------------------------------------------------------------------- broken manifests

_NODE = """\
apiVersion: v1
kind: Node
metadata: {name: some-node}
"""
_WEB = "{name: web, namespace: shop}"


def _service(metadata: str, port: str) -> str:
    """A Service document at 127.0.80.9 with this ``metadata`` and one ``port``."""
    return f"""\
apiVersion: v1
kind: Service
metadata: {metadata}
spec:
  clusterIP: 127.0.80.9
  ports: [{port}]
"""


BROKEN: dict[str, tuple[str, list[str]]] = {
    # id: (file content, what the message must say after the file name)
    "bad-yaml": (
        """\
apiVersion: v1
kind: Service
metadata:
  name: web: oops
spec:
  clusterIP: 127.0.80.9
""",
        ["line 4", "YAML syntax error"],
    ),
    "missing-name": (
        _NODE + "---\n" + _service("{namespace: shop}", "{name: http, protocol: TCP, port: 80}"),
        ["document 2", "Service shop/", "metadata.name", "required"],
    ),
    "port-out-of-range": (
        _NODE + "---\n" + _service(_WEB, "{name: http, protocol: TCP, port: 70000}"),
        ["document 2", "Service shop/web", "spec.ports[0].port", "70000"],
    ),
    "unknown-protocol": (
        _service(_WEB, "{name: http, protocol: HTTP, port: 80}"),
        ["document 1", "Service shop/web", "spec.ports[0].protocol", "HTTP"],
    ),
    "slice-without-service-label": (
        _NODE
        + """\
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: shop}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 9376}]
endpoints: [{addresses: [127.0.81.9]}]
""",
        ["document 2", "EndpointSlice shop/web-abc", "kubernetes.io/service-name"],
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_manifests_exit_2_naming_file_document_object_and_field(
    tmp_path: Path, case: str
) -> None:
    content, expected = BROKEN[case]
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(content)
    result = run_cli("run", "--manifests", str(manifest))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if str(manifest) in line]
    assert len(lines) == 1, result.stderr
    message = lines[0]
    assert message.startswith(f"{manifest}: "), message
    for part in expected:
        assert part in message, (part, message)


def test_broken_manifest_in_a_directory_is_named(tmp_path: Path) -> None:
    content, _ = BROKEN["port-out-of-range"]
    (tmp_path / "a-good.yaml").write_text(_NODE.replace("some-node", "other-node"))
    (tmp_path / "b-bad.yaml").write_text(content)
    result = run_cli("run", "--manifests", str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert f"{tmp_path / 'b-bad.yaml'}: document 2: Service shop/web: spec.ports[0].port" in (
        result.stderr
    )
    assert "a-good.yaml" not in result.stderr


def test_missing_manifests_path_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here.yaml"
    result = run_cli("run", "--manifests", str(missing))
    assert result.returncode == 2
    assert str(missing) in result.stderr
    assert "--manifests" in result.stderr


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--min-sync-period", "abc"),
        ("--shutdown-grace", "-1s"),
        ("--loop", "tokio"),
        ("--max-connections", "many"),
    ],
)
def test_invalid_flag_value_exits_2(tmp_path: Path, flag: str, value: str) -> None:
    (tmp_path / "node.yaml").write_text(_NODE)
    result = run_cli("run", "--manifests", str(tmp_path), flag, value)
    assert result.returncode == 2, result.stderr
    assert flag in result.stderr
    assert "usage:" in result.stderr


def test_version_exits_0() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("userproxy "), result.stdout


def test_run_help_of_the_installed_script_exits_0() -> None:
    script = Path(sys.executable).parent / "userproxy"
    result = subprocess.run(
        [str(script), "run", "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "--manifests" in result.stdout
    assert "--shutdown-grace" in result.stdout


# --------------------------------------------------------------------------- a running proxy


def echo_service(
    tmp_path: Path, host: int, net: int = 80
) -> contextlib.AbstractContextManager[tuple[tuple[str, int], Path]]:
    """An echo Service at 127.0.NET.HOST:8080 (backend 127.0.NET+1.HOST)."""
    service, backend = f"127.0.{net}.{host}", f"127.0.{net + 1}.{host}"
    return manifests_echo_service(tmp_path, service, backend, SERVICE_PORT)


def exchange(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data`` and read back as many bytes (the backend echoes)."""
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(len(data) - len(got))
        if not chunk:
            break
        got += chunk
    return got


def wait_refused(address: tuple[str, int], timeout: float) -> float:
    """Try new connections until one is refused; returns how long that took."""
    started = time.monotonic()
    while True:
        try:
            socket.create_connection(address, timeout=1).close()
        except ConnectionRefusedError:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{address} still accepts connections after {timeout} s")
        time.sleep(0.02)


def output_of(proc: subprocess.Popen[str]) -> str:
    """What an exited proxy_process wrote (stdout and stderr together)."""
    assert proc.stdout is not None
    return proc.stdout.read()


@contextlib.contextmanager
def signalled_with_a_connection_open(
    service: contextlib.AbstractContextManager[tuple[tuple[str, int], Path]],
    grace: str,
    signum: signal.Signals = signal.SIGTERM,
) -> Iterator[tuple[subprocess.Popen[str], socket.socket, tuple[str, int]]]:
    """``userproxy run --shutdown-grace GRACE`` serving the echo ``service``, a connection
    through it that has echoed, then ``signum`` sent: yields the process, that connection
    and the Service's address."""
    with (
        service as (address, manifests),
        proxy_process(["run", "--manifests", str(manifests), "--shutdown-grace", grace]) as proc,
    ):
        wait_listening(address)
        with socket.create_connection(address, timeout=10) as conn:
            assert exchange(conn, b"hello") == b"hello"
            proc.send_signal(signum)
            yield proc, conn, address


def test_sigterm_stops_accepting_and_lets_open_connections_finish(tmp_path: Path) -> None:
    with signalled_with_a_connection_open(echo_service(tmp_path, 1), "5s") as (proc, conn, address):
        signalled = time.monotonic()
        assert wait_refused(address, timeout=3) < 3
        # The open connection goes on working, in both directions, then half-closes.
        assert exchange(conn, b"during the grace") == b"during the grace"
        conn.shutdown(socket.SHUT_WR)
        assert recv_all(conn) == b""
        conn.close()
        returncode = proc.wait(timeout=5)
        elapsed = time.monotonic() - signalled
        assert returncode == 0, output_of(proc)
        # The last connection ended: the process need not wait out the grace.
        assert elapsed < 5, elapsed


def test_connection_left_open_is_closed_when_the_grace_ends(tmp_path: Path) -> None:
    with signalled_with_a_connection_open(echo_service(tmp_path, 2), "1s") as (proc, conn, _):
        signalled = time.monotonic()
        try:
            rest = recv_all(conn)  # blocks until the proxy closes the connection
        except ConnectionResetError:
            rest = b""
        closed_after = time.monotonic() - signalled
        conn.close()
        assert rest == b""
        assert 0.9 <= closed_after < 5, closed_after
        returncode = proc.wait(timeout=5)
        output = output_of(proc)
        assert returncode == 0, output
        assert "aborted 1 connections" in output


def test_log_format_json_writes_json_lines_to_stderr(tmp_path: Path) -> None:
    with echo_service(tmp_path, 3) as (address, manifests):
        args = ["run", "--manifests", str(manifests), "--log-format", "json"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "userproxy", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_listening(address)
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, stderr
    assert stdout == ""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "no log lines on stderr"
    entries = [json.loads(line) for line in lines]
    for entry in entries:
        assert isinstance(entry, dict)
        assert {"ts", "level", "logger", "msg"} <= entry.keys(), entry
    serving = [e for e in entries if "serving manifests" in e["msg"]]
    assert serving, entries
    assert serving[0]["level"] == "info"
    assert serving[0]["logger"] == "userproxy.proxy"
    assert str(manifests) in serving[0]["msg"]


def test_kube_proxy_configuration_file_is_reported_and_flags_override_it(
    tmp_path: Path,
) -> None:
    """kubeadm's kube-proxy config loads; applied and ignored fields are logged once; the
    --manifests flag replaces the file's API source."""
    config = Path(__file__).parents[2] / "examples" / "config" / "kube-proxy-config.yaml"
    with echo_service(tmp_path, 7) as (address, manifests):
        args = ["run", "--config", str(config), "--manifests", str(manifests)]
        with proxy_process(args) as proc:
            wait_listening(address)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
            output = output_of(proc)
    line = next(line for line in output.splitlines() if "config file" in line)
    assert "applied: clientConnection.kubeconfig, clusterCIDR" in line
    assert "ignored: bindAddress" in line
    assert "overridden by the command line: kubeconfig" in line


def test_broken_config_file_exits_2_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
        "kind: KubeProxyConfiguration\n"
        "iptables:\n  syncPeriod: abc\n"
    )
    manifests = tmp_path / "m.yaml"
    manifests.write_text("")
    result = run_cli("run", "--config", str(config), "--manifests", str(manifests))
    assert result.returncode == 2
    assert "iptables.syncPeriod" in result.stderr
    assert "is not a duration" in result.stderr
