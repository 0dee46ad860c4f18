"""Signals of a running ``userproxy run``: a second SIGINT/SIGTERM forces the shutdown,
SIGHUP reloads the settings and the manifests without ending anything.

Each test runs ``python -m userproxy`` as a child and talks to it through a real echo
backend and the metrics server's ``/configz``.

Addresses: Services on 127.0.86.N:8080, backends on 127.0.87.N, the metrics server on
127.0.86.200 (no other test uses these).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.process.test_cli import echo_service as cli_echo_service
from tests.process.test_cli import (
    exchange,
    output_of,
    run_cli,
    signalled_with_a_connection_open,
    wait_refused,
)
from tests.support.proxyrun import (
    free_port,
    proxy_process,
    wait_listening,
    wait_logged,
    wait_until,
)

METRICS_IP = "127.0.86.200"


def echo_service(tmp_path: Path, host: int) -> AbstractContextManager[tuple[tuple[str, int], Path]]:
    """An echo Service at 127.0.86.HOST:8080 (backend 127.0.87.HOST)."""
    return cli_echo_service(tmp_path, host, net=86)


@pytest.mark.parametrize(
    ("first", "second"),
    [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGTERM)],
    ids=["sigint-twice", "sigterm-twice"],
)
def test_a_second_signal_during_the_grace_exits_at_once(
    tmp_path: Path, first: signal.Signals, second: signal.Signals
) -> None:
    host = 1 if first == signal.SIGINT else 2
    service = echo_service(tmp_path, host)
    with signalled_with_a_connection_open(service, "30s", first) as (proc, conn, address):
        wait_refused(address, timeout=5)  # the shutdown has begun...
        # ... and the open connection keeps the 30 s grace period going.
        assert exchange(conn, b"still here") == b"still here"
        assert proc.poll() is None
        proc.send_signal(second)
        signalled = time.monotonic()
        returncode = proc.wait(timeout=10)
        exited_after = time.monotonic() - signalled
        conn.settimeout(5)
        try:
            rest = conn.recv(100)
        except ConnectionResetError:
            rest = b""
        output = output_of(proc)
    assert exited_after < 1.0, (exited_after, output)
    assert returncode == 128 + second, output
    assert rest == b"", "the connection was closed"
    # The probes of wait_listening/wait_refused may still be counted as they close.
    assert re.search(r"waiting up to 30s for [1-9]\d* open connections", output), output
    assert f"{second.name} again: closing open connections now" in output, output
    assert "aborted 1 connections still open (forced)" in output, output


def configz(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://{METRICS_IP}:{port}/configz", timeout=5) as response:
        body: dict[str, object] = json.load(response)
    return body


def own_settings(port: int) -> dict[str, object]:
    value = configz(port)["userproxy.io"]
    assert isinstance(value, dict)
    return value


def config_text(*, hostname: str, sync_period: str, idle: str) -> str:
    return f"""\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
hostnameOverride: {hostname}
iptables:
  syncPeriod: {sync_period}
---
apiVersion: userproxy.io/v1alpha1
kind: UserProxyConfiguration
tcpIdleTimeout: {idle}
"""


def test_sighup_applies_the_config_file_and_keeps_open_connections(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(config_text(hostname="node-a", sync_period="30s", idle="1h0m0s"))
    metrics = f"--metrics-bind-address={METRICS_IP}:{port}"
    log = tmp_path / "proxy.log"
    with echo_service(tmp_path, 3) as (address, manifests):
        args = ["run", "--manifests", str(manifests), "--config", str(config), metrics]
        with proxy_process(args, log=log) as proc:
            _sighup_scene(proc, address, port, config, log)
    output = log.read_text()
    applied = [line for line in output.splitlines() if "reloaded the settings" in line]
    assert len(applied) == 1, output
    assert "applied --sync-period=45.0, --tcp-idle-timeout=7200.0" in applied[0], applied[0]
    assert "needs a restart (kept as they were): --hostname-override" in applied[0]
    assert "re-reading the manifests" in output, output
    rejected = [line for line in output.splitlines() if "keeping the last good settings" in line]
    assert len(rejected) == 1, output
    assert "syncPeriod" in rejected[0], rejected[0]


def _sighup_scene(
    proc: subprocess.Popen[str], address: tuple[str, int], port: int, config: Path, log: Path
) -> None:
    """An echo connection open across two SIGHUPs: a good edit, then a broken one."""
    wait_listening(address)
    wait_until(lambda: bool(configz(port)), what="the metrics server")
    assert own_settings(port)["sync_period"] == 30.0
    with socket.create_connection(address, timeout=10) as conn:
        assert exchange(conn, b"before") == b"before"

        # A changed period and timeout (applied) and a changed name (needs a restart).
        config.write_text(config_text(hostname="node-b", sync_period="45s", idle="2h0m0s"))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: own_settings(port)["sync_period"] == 45.0, what="the new syncPeriod")
        settings = own_settings(port)
        assert settings["tcp_idle_timeout"] == 7200.0
        # Still the name it started with: a new one needs a restart.
        assert settings["hostname"] == "node-a"
        assert exchange(conn, b"after the reload") == b"after the reload"

        # A file that became invalid: logged, the last good settings stay.
        config.write_text(config_text(hostname="node-a", sync_period="soon", idle="2h0m0s"))
        proc.send_signal(signal.SIGHUP)
        wait_logged(log, "keeping the last good settings")
        assert proc.poll() is None
        assert own_settings(port)["sync_period"] == 45.0
        assert exchange(conn, b"after the bad edit") == b"after the bad edit"
        with socket.create_connection(address, timeout=5) as fresh:
            assert exchange(fresh, b"new connection") == b"new connection"
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        conn.shutdown(socket.SHUT_WR)
        assert proc.wait(timeout=15) == 0


def test_sighup_never_ends_a_proxy_without_a_config_file(tmp_path: Path) -> None:
    """With flags only, SIGHUP re-reads the manifests and changes nothing else."""
    log = tmp_path / "proxy.log"
    with (
        echo_service(tmp_path, 4) as (address, manifests),
        proxy_process(["run", "--manifests", str(manifests)], log=log) as proc,
    ):
        wait_listening(address)
        with socket.create_connection(address, timeout=10) as conn:
            for _ in range(3):
                proc.send_signal(signal.SIGHUP)
            # Signals sent at once may arrive as one: wait for the first reload's line.
            wait_logged(log, "reloaded the settings")
            assert proc.poll() is None
            assert exchange(conn, b"echo") == b"echo"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        output = log.read_text()
    assert "applied none; nothing needs a restart" in output, output


def test_cleanup_help_and_an_invalid_device_name() -> None:
    """The netlink part is tested in a network namespace (tests/netns/test_cleanup.py)."""
    assert run_cli("cleanup", "--help").returncode == 0
    result = run_cli("cleanup", "--address-device", "x" * 16)
    assert result.returncode == 2, result.stderr
    assert "--address-device" in result.stderr
    assert "Traceback" not in result.stderr
