"""Every user error through the real CLI: exit 2, one line naming the cause, no traceback.

Also what is not an exit but must be said: a port below 1024 without the privilege, a
connection limit the open-files limit cannot serve, and the demo's temporary directory.

Addresses: Services on 127.0.82.x (no other test uses them); the demo's fixed addresses
(127.0.50.1:8080, 127.0.60.x:9376), so like tests/process/test_demo.py these run serially.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.process.test_cli import run_cli as run_userproxy
from tests.support.backends import Backend, echo
from tests.support.manifests import endpoint_slice, service, write
from tests.support.proxyrun import free_port, proxy_process, wait_listening
from userproxy.dataplane.limits import FD_RESERVE, default_udp_sessions
from userproxy.demo import SERVICE_ADDRESS

ROOT = Path(__file__).resolve().parents[2]
NODE = "apiVersion: v1\nkind: Node\nmetadata: {name: some-node}\n"
KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {token: abc}}]
contexts: [{name: a, context: {cluster: c, user: u}}]
"""
NO_ADMIN = ("--healthz-bind-address=", "--metrics-bind-address=")


def env_without_cluster(**extra: str) -> dict[str, str]:
    """The test's environment without a pod's KUBERNETES_SERVICE_HOST, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_SERVICE")}
    env.update(extra)
    return env


def run_cli(
    args: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m userproxy ARGS`` to completion, without any cluster settings in its
    environment unless ``env`` is given."""
    return run_userproxy(*args, cwd=cwd, env=env if env is not None else env_without_cluster())


def child(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> contextlib.AbstractContextManager[subprocess.Popen[str]]:
    """``python -m userproxy ARGS`` running, without any cluster settings in its
    environment unless ``env`` is given (see ``proxy_process``)."""
    return proxy_process(
        args, cwd, env=env if env is not None else env_without_cluster(), prefix=prefix
    )


def read_until(proc: subprocess.Popen[str], needle: str, timeout: float = 15.0) -> str:
    """The child's output up to and including the first line containing ``needle``."""
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} not in the output:\n{''.join(seen)}")


# --------------------------------------------------------------------------- the table


@dataclass
class Case:
    """A command line (``{tmp}`` is the test's directory) and what its message must say."""

    args: tuple[str, ...]
    says: tuple[str, ...]
    never: tuple[str, ...] = ()
    files: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def kubeconfig(current: str | None) -> str:
    return KUBECONFIG + (f"current-context: {current}\n" if current else "")


CASES: dict[str, Case] = {
    "kubeconfig-not-yaml": Case(
        ("run", "--kubeconfig", "{tmp}/kc", *NO_ADMIN),
        ("--kubeconfig", "{tmp}/kc", "not a kubeconfig", "YAML syntax error"),
        files={"kc": "clusters: [oops\n"},
    ),
    "kubeconfig-not-a-mapping": Case(
        ("run", "--kubeconfig", "{tmp}/kc", *NO_ADMIN),
        ("{tmp}/kc", "not a kubeconfig"),
        files={"kc": "just words\n"},
    ),
    "kubeconfig-without-current-context": Case(
        ("run", "--kubeconfig", "{tmp}/kc", *NO_ADMIN),
        ("{tmp}/kc", "has no current-context"),
        files={"kc": kubeconfig(None)},
    ),
    "kubeconfig-context-missing": Case(
        ("run", "--kubeconfig", "{tmp}/kc", *NO_ADMIN),
        ("{tmp}/kc", "current-context 'elsewhere' is not among its contexts"),
        files={"kc": kubeconfig("elsewhere")},
    ),
    "kubeconfig-from-the-file-names-the-field": Case(
        ("run", "--config", "{tmp}/config.yaml", *NO_ADMIN),
        ("config.yaml: KubeProxyConfiguration.clientConnection.kubeconfig", "no current-context"),
        never=("--kubeconfig",),
        files={
            "kc": kubeconfig(None),
            "config.yaml": "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
            "kind: KubeProxyConfiguration\nclientConnection: {kubeconfig: '{tmp}/kc'}\n",
        },
    ),
    "in-cluster-without-token": Case(
        ("run", *NO_ADMIN),
        ("in-cluster configuration", "ServiceAccount token"),
        env={"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"},
    ),
    "example-config-as-its-header-says": Case(
        ("run", "--config", str(ROOT / "examples" / "config" / "userproxy-config.yaml")),
        ("KubeProxyConfiguration.clientConnection.kubeconfig", "is not a file"),
        never=("--kubeconfig",),
    ),
    "address-device-too-long": Case(
        ("run", "--manifests", "{tmp}/m.yaml", "--address-device", "userproxy-devices"),
        ("--address-device", "17 characters long", "at most 15 (IFNAMSIZ)"),
        never=("CAP_NET_ADMIN",),
    ),
    "address-device-too-long-in-the-file": Case(
        ("run", "--manifests", "{tmp}/m.yaml", "--config", "{tmp}/config.yaml"),
        ("UserProxyConfiguration.addressDevice", "17 characters long", "IFNAMSIZ"),
        files={
            "config.yaml": "apiVersion: userproxy.io/v1alpha1\nkind: UserProxyConfiguration\n"
            "addressDevice: userproxy-devices\n"
        },
    ),
    "sync-period-nan": Case(
        ("run", "--manifests", "{tmp}/m.yaml", "--sync-period", "nan"),
        ("--sync-period", "NaN is not a duration"),
    ),
    "sync-period-infinite": Case(
        ("run", "--manifests", "{tmp}/m.yaml", "--shutdown-grace", "inf"),
        ("--shutdown-grace", "out of range"),
    ),
    "negative-duration": Case(
        ("run", "--manifests", "{tmp}/m.yaml", "--tcp-fin-timeout=-1s"),
        ("--tcp-fin-timeout", "-1s is negative"),
    ),
    "min-sync-period-over-sync-period": Case(
        ("run", "--manifests", "{tmp}/m.yaml", "--sync-period", "10s", "--min-sync-period", "1m"),
        ("--min-sync-period", "1m0s is greater than the sync period (10s)"),
    ),
    "two-ipv4-cluster-cidrs": Case(
        ("run", "--manifests", "{tmp}/m.yaml", "--cluster-cidr", "10.0.0.0/8,10.1.0.0/16"),
        ("--cluster-cidr", "two IPv4 CIDRs"),
    ),
    "kubeconfig-empty-is-in-cluster": Case(
        ("run", "--kubeconfig=", *NO_ADMIN),
        ("give exactly one source",),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line_exit_2_no_traceback(tmp_path: Path, name: str) -> None:
    case = CASES[name]

    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp_path))

    (tmp_path / "m.yaml").write_text(NODE)
    for file, content in case.files.items():
        (tmp_path / file).write_text(fill(content))
    if (
        name == "in-cluster-without-token"
        and Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()
    ):
        pytest.skip("this machine has a ServiceAccount token")
    result = run_cli([fill(arg) for arg in case.args], env=env_without_cluster(**case.env))
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert "serving" not in output, "the message must come before anything starts"
    messages = [
        line for line in result.stderr.splitlines() if line.startswith(("userproxy:", "userproxy "))
    ]
    assert len(messages) == 1, output
    for part in case.says:
        assert fill(part) in messages[0], (part, messages[0])
    for part in case.never:
        assert part not in output, (part, output)


# --------------------------------------------------------------------------- the demo


def test_second_demo_exits_2_naming_the_running_one(tmp_path: Path) -> None:
    with child(["demo", *NO_ADMIN], cwd=ROOT) as first:
        read_until(first, "is running")
        result = run_cli(["demo", *NO_ADMIN], cwd=ROOT)
        output = result.stdout + result.stderr
        assert result.returncode == 2, output
        assert "Traceback" not in output
        assert "is running" not in output
        assert "another userproxy demo running?" in result.stderr, output
        assert first.poll() is None, "the first demo must go on"


def test_demo_exits_2_when_its_service_address_is_taken() -> None:
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(SERVICE_ADDRESS)
        holder.listen()
        result = run_cli(["demo", *NO_ADMIN], cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert "is running" not in output
    ip, port = SERVICE_ADDRESS
    assert f"demo: cannot listen on {ip}:{port}: Address already in use" in result.stderr


def test_demo_outside_the_clone_removes_its_temporary_directory(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with child(["demo", *NO_ADMIN], cwd=elsewhere, env=env_without_cluster(TMPDIR=str(temp))) as p:
        output = read_until(p, "is running")
        assert [d.name for d in temp.iterdir() if d.name.startswith("userproxy-demo-")], output
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=15) == 0
    assert list(temp.iterdir()) == []


# --------------------------------------------------------------------------- said, not fatal


def _metric(port: int, name: str) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def _unprivileged() -> list[str]:
    """A command prefix that runs the child without CAP_NET_BIND_SERVICE."""
    if Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text().strip() == "0":
        pytest.skip("every port is unprivileged on this machine")
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root without setpriv: cannot drop CAP_NET_BIND_SERVICE")
    return [setpriv, "--inh-caps=-net_bind_service", "--bounding-set=-net_bind_service"]


def test_privileged_port_says_what_is_needed_and_counts_as_bind_error(tmp_path: Path) -> None:
    prefix = _unprivileged()
    backend = Backend("127.0.82.2", echo)
    try:
        write(
            tmp_path / "web.json",
            service("web", "127.0.82.1", 81),
            endpoint_slice("web-a", "web", backend.port, [backend.ip]),
        )
        metrics = free_port()
        args = ["run", "--manifests", str(tmp_path), "--healthz-bind-address="]
        args += ["--metrics-bind-address", f"127.0.0.1:{metrics}"]
        with child(args, prefix=prefix) as proc:
            line = read_until(proc, "cannot listen on 127.0.82.1:81").splitlines()[-1]
            assert "CAP_NET_BIND_SERVICE" in line, line
            assert "net.ipv4.ip_unprivileged_port_start" in line, line
            wait_listening(("127.0.0.1", metrics))
            errors = _metric(metrics, "userproxy_listener_bind_errors")
            assert any(
                'service_port="default/web:tcp"' in e and e.endswith(" 1.0") for e in errors
            ), errors
    finally:
        backend.stop()


def test_max_connections_over_the_open_files_limit_warns_with_what_can_be_served(
    tmp_path: Path,
) -> None:
    nofile = 1024
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("no prlimit to lower the open-files limit of the child")
    (tmp_path / "m.yaml").write_text(NODE)
    servable = (nofile - FD_RESERVE - default_udp_sessions(nofile)) // 2
    args = ["run", "--manifests", str(tmp_path), "--max-connections", "100000", *NO_ADMIN]
    with child(args, prefix=[prlimit, f"--nofile={nofile}:{nofile}"]) as proc:
        output = read_until(proc, "serving manifests")
    warning = next(line for line in output.splitlines() if "--max-connections" in line)
    assert "WARNING" in warning, warning
    assert f"serves only {servable} connections" in warning, warning
    assert f"open-files limit {nofile}" in warning, warning


def test_max_connections_within_the_open_files_limit_does_not_warn(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(NODE)
    args = ["run", "--manifests", str(tmp_path), "--max-connections", "16", *NO_ADMIN]
    with child(args) as proc:
        output = read_until(proc, "serving manifests")
    assert "--max-connections" not in output, output
