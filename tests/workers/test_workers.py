"""``userproxy run --workers 2`` with manifests: both workers serve, ClientIP affinity holds
whichever worker accepts, a killed worker is started again while the other serves, the
metrics and /status cover both, and nothing outlives the parent.

Real processes and sockets: the proxy is a child (tests/workers/support.py), the backends
are threads answering their own name (tests/support/backends.py), the clients blocking
sockets.  Each data-path test runs with the workers on asyncio and on uvloop (``--loop``).
Addresses: 127.241.N.x (support.py).
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import urllib.error
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.backends import Backend, UdpBackend, ask, name_server
from tests.support.manifests import endpoint_slice, service, write
from tests.support.proxyrun import assert_clean_log, wait_logged, wait_until
from tests.workers.support import (
    admin_url,
    alive,
    children,
    fresh_net,
    get_json,
    get_text,
    kill,
    samples,
    wait_gone,
    wait_serving,
    workers_proxy,
)

LOOPS = ("asyncio", "uvloop")
PORT = 8080


@pytest.fixture
def backends() -> Iterator[tuple[int, list[Backend]]]:
    """Four backends on a fresh net, each answering its own name ("b11" ... "b14")."""
    net = fresh_net()
    started = [Backend(f"127.241.{net}.{n}", name_server(f"b{n}")) for n in range(11, 15)]
    try:
        yield net, started
    finally:
        for backend in started:
            backend.stop()


def _manifests(
    tmp_path: Path, net: int, backends: list[Backend], affinity: int | None = None
) -> Path:
    directory = tmp_path / "manifests"
    directory.mkdir(exist_ok=True)
    write(
        directory / "web.json",
        service("web", f"127.241.{net}.1", PORT, affinity_timeout=affinity),
        endpoint_slice("web-a", "web", backends[0].port, [b.ip for b in backends]),
    )
    return directory


def _accepted(net: int) -> dict[str, float]:
    metrics = get_text(admin_url(net) + "/metrics")
    return samples(metrics, "userproxy_connections_accepted_total")


@pytest.mark.parametrize("loop", LOOPS)
def test_both_workers_serve_and_the_status_and_metrics_cover_both(
    tmp_path: Path, backends: tuple[int, list[Backend]], loop: str
) -> None:
    net, started = backends
    for backend in started[1:]:  # every backend on one port: the slice has one port
        backend.stop()
    same_port = [Backend(f"127.241.{net}.{n}", name_server(f"b{n}"), started[0].port)
                 for n in range(12, 15)]  # fmt: skip
    try:
        manifests = _manifests(tmp_path, net, [started[0], *same_port])
        log = tmp_path / "proxy.log"
        with workers_proxy(["--manifests", str(manifests)], net, log, loop) as proc:
            rows = wait_serving(net)
            pids = {row["pid"] for row in rows}
            assert len(pids) == 2
            assert pids == children(proc.pid)  # the workers are the parent's children
            answers = Counter(ask((f"127.241.{net}.1", PORT)) for _ in range(200))
            assert sum(answers.values()) == 200
            assert set(answers) == {"b11", "b12", "b13", "b14"}
            accepted = _accepted(net)
            # SO_REUSEPORT spreads connections by a hash of the 4-tuple: both get some.
            assert set(accepted) == {"0", "1"}, accepted
            assert accepted["0"] > 0, accepted
            assert accepted["1"] > 0, accepted
            assert accepted["0"] + accepted["1"] == 200
            status = get_json(admin_url(net) + "/status")
            (port,) = status["services"][0]["ports"]
            assert port["totals"]["accepted"] == 200  # summed over the workers
            endpoints = {e["address"]: e["connections_total"] for e in port["endpoints"]}
            assert sum(endpoints.values()) == 200
            assert all(n > 0 for n in endpoints.values()), endpoints
            assert {row["pid"] for row in status["workers"]} == pids
            assert status["control"]["pid"] == proc.pid
            up = samples(get_text(admin_url(net) + "/metrics"), "userproxy_worker_up")
            assert up == {"0": 1.0, "1": 1.0}
    finally:
        for backend in same_port:
            backend.stop()
    assert_clean_log(log)


@pytest.mark.parametrize("loop", LOOPS)
def test_client_ip_affinity_holds_across_workers(
    tmp_path: Path, backends: tuple[int, list[Backend]], loop: str
) -> None:
    net, started = backends
    for backend in started[1:]:
        backend.stop()
    same_port = [Backend(f"127.241.{net}.{n}", name_server(f"b{n}"), started[0].port)
                 for n in range(12, 15)]  # fmt: skip
    try:
        manifests = _manifests(tmp_path, net, [started[0], *same_port], affinity=600)
        log = tmp_path / "proxy.log"
        with workers_proxy(["--manifests", str(manifests)], net, log, loop):
            wait_serving(net)
            chosen: dict[str, set[str]] = {}
            for client in range(50, 58):
                source = f"127.241.{net}.{client}"
                chosen[source] = {ask((f"127.241.{net}.1", PORT), source=source) for _ in range(40)}
            accepted = _accepted(net)
            # Both workers accepted connections of these clients ...
            assert accepted.get("0", 0) > 0, accepted
            assert accepted.get("1", 0) > 0, accepted
            # ... and every client kept one endpoint, whichever worker accepted it.
            assert all(len(names) == 1 for names in chosen.values()), chosen
            # The hash spreads the clients over the endpoints (8 clients, 4 endpoints).
            assert len(set().union(*chosen.values())) > 1, chosen
    finally:
        for backend in same_port:
            backend.stop()
    assert_clean_log(log)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_killed_worker_is_started_again_while_the_other_serves(
    tmp_path: Path, backends: tuple[int, list[Backend]], loop: str
) -> None:
    net, started = backends
    manifests = _manifests(tmp_path, net, started[:1])
    log = tmp_path / "proxy.log"
    address = (f"127.241.{net}.1", PORT)
    with workers_proxy(["--manifests", str(manifests)], net, log, loop) as proc:
        rows = wait_serving(net)
        victim, survivor = rows[0]["pid"], rows[1]["pid"]
        kill(victim)
        wait_gone(victim)
        # Until worker 0 is back, worker 1 alone serves every connection.
        served = 0
        while not alive_again(net):
            assert ask(address) == "b11"
            served += 1
        assert served > 0
        rows = wait_serving(net)
        assert rows[0]["pid"] not in (victim, survivor)
        assert rows[0]["restarts"] == 1
        assert rows[1]["pid"] == survivor
        assert rows[1]["restarts"] == 0
        assert children(proc.pid) == {rows[0]["pid"], survivor}
        restarts = samples(get_text(admin_url(net) + "/metrics"), "userproxy_worker_restarts_total")
        assert restarts == {"0": 1.0, "1": 0.0}
        # The new worker 0 serves too.
        before = _accepted(net).get("0", 0.0)
        for _ in range(100):
            assert ask(address) == "b11"
        assert _accepted(net)["0"] > before
    output = log.read_text()
    assert f"worker 0 (pid {victim}) exited with status -9" in output
    assert_clean_log(log)


def alive_again(net: int) -> bool:
    """Whether worker 0 runs again and answers (its /healthz through the parent)."""
    try:
        rows = get_json(admin_url(net) + "/healthz")["workers"]
    except urllib.error.HTTPError as error:  # 503 while worker 0 is away: its body says so
        rows = json.load(error)["workers"]
    return bool(rows[0]["alive"] and rows[0]["healthy"])


@pytest.mark.parametrize("loop", LOOPS)
def test_udp_flows_are_spread_over_both_workers(tmp_path: Path, loop: str) -> None:
    """SO_REUSEPORT on UDP: each client (ip, port) flow goes to one worker, the flows of
    many clients to both, and every datagram is answered."""
    net = fresh_net()
    backend = UdpBackend(f"127.241.{net}.11")
    try:
        directory = tmp_path / "manifests"
        directory.mkdir()
        raw_slice = endpoint_slice("dns-a", "dns", backend.port, [backend.ip], port_name="udp")
        for port in raw_slice["ports"]:
            port["protocol"] = "UDP"
        write(
            directory / "dns.json",
            service("dns", f"127.241.{net}.1", 53, port_name="udp", protocol="UDP"),
            raw_slice,
        )
        log = tmp_path / "proxy.log"
        with workers_proxy(["--manifests", str(directory)], net, log, loop):
            wait_serving(net)
            # All 40 stay open to the end: a port closed and bound again would be one flow.
            with contextlib.ExitStack() as open_sockets:
                for client in range(40):
                    sock = open_sockets.enter_context(
                        socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    )
                    sock.settimeout(5)
                    sock.bind((f"127.241.{net}.50", 0))
                    for n in range(3):
                        payload = f"{client}-{n}".encode()
                        sock.sendto(payload, (f"127.241.{net}.1", 53))
                        try:
                            answer = sock.recvfrom(100)[0]
                        except TimeoutError:
                            raise AssertionError(f"no answer to {payload!r}") from None
                        assert answer == payload
            metrics = get_text(admin_url(net) + "/metrics")
            created = samples(metrics, "userproxy_udp_sessions_created_total")
            assert sum(created.values()) == 40, created  # one session per client flow
            assert created.get("0", 0) > 0, created
            assert created.get("1", 0) > 0, created
    finally:
        backend.stop()
    assert_clean_log(log)


def test_sighup_reloads_the_settings_in_every_worker(
    tmp_path: Path, backends: tuple[int, list[Backend]]
) -> None:
    net, started = backends
    manifests = _manifests(tmp_path, net, started[:1])
    config = tmp_path / "config.yaml"
    head = "apiVersion: userproxy.io/v1alpha1\nkind: UserProxyConfiguration\n"
    config.write_text(head + "tcpFinTimeout: 1m\n")
    log = tmp_path / "proxy.log"
    args = ["--manifests", str(manifests), "--config", str(config)]
    with workers_proxy(args, net, log, "uvloop") as proc:
        wait_serving(net)
        config.write_text(head + "tcpFinTimeout: 3m\n")
        proc.send_signal(signal.SIGHUP)
        for worker in (0, 1):
            wait_logged(
                log, f"worker {worker}: reloaded the settings: applied --tcp-fin-timeout=180"
            )
        assert ask((f"127.241.{net}.1", PORT)) == "b11"  # serving on, as before
        configz = get_json(admin_url(net) + "/configz")["userproxy.io"]
        assert configz["workers"] == 2
        assert configz["tcp_fin_timeout"] == 180
    assert_clean_log(log)


def test_sigterm_stops_every_worker_gracefully(
    tmp_path: Path, backends: tuple[int, list[Backend]]
) -> None:
    net, started = backends
    manifests = _manifests(tmp_path, net, started[:1])
    log = tmp_path / "proxy.log"
    with workers_proxy(["--manifests", str(manifests)], net, log, "uvloop") as proc:
        pids = {row["pid"] for row in wait_serving(net)}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        wait_until(lambda: not any(alive(pid) for pid in pids), 10.0, "the workers gone")
    output = log.read_text()
    assert output.count("shutting down: no longer accepting connections") == 2
    assert "worker 0 (pid" in output
    assert "worker 1 (pid" in output
    assert_clean_log(log)


def test_no_worker_outlives_a_killed_parent(
    tmp_path: Path, backends: tuple[int, list[Backend]]
) -> None:
    net, started = backends
    manifests = _manifests(tmp_path, net, started[:1])
    log = tmp_path / "proxy.log"
    with workers_proxy(["--manifests", str(manifests)], net, log, "asyncio") as proc:
        rows = wait_serving(net)
        pids = {row["pid"] for row in rows}
        sockets = Path(rows[0]["admin_socket"]).parent
        assert sockets.is_dir()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5)
        wait_until(lambda: not any(alive(pid) for pid in pids), 10.0, "the workers gone")
        # The last worker out removed the admin sockets' directory the parent could not.
        assert not sockets.exists()
    # PR_SET_PDEATHSIG's SIGTERM or the closed channel, whichever came first: both stop.
    output = log.read_text()
    assert "worker 0: stopped" in output
    assert "worker 1: stopped" in output


def test_workers_must_be_at_least_one(tmp_path: Path) -> None:
    manifests = tmp_path / "m.json"
    write(manifests)
    result = subprocess.run(
        [sys.executable, "-m", "userproxy", "run", "--manifests", str(manifests), "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "--workers: 0 must be at least 1" in result.stderr, result.stderr
