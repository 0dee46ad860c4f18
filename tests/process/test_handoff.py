"""Listening-socket handoff between ``userproxy run`` processes (``--handoff-socket``).

Every test runs real processes: an old proxy, then new ones started with the same
handoff socket, under real load (wrk with a new connection per request, a UDP
request/reply client) or with a long-lived connection held open, and checks what clients
see: never a refused or reset connection, never a lost reply, and the open connection
drained through the old process until its grace.

Addresses: Services on 127.0.120.N, backends on 127.0.121.N (no other test uses these).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.process.test_cli import exchange
from tests.support.backends import Backend, UdpBackend, echo
from tests.support.load import UdpLoad, WrkResult, nginx_http, start_wrk, wrk_result
from tests.support.manifests import endpoint_slice, service, write
from tests.support.proxyrun import (
    assert_clean_log,
    free_port,
    proxy_process,
    stop_process,
    wait_listening,
    wait_logged,
)

SVC, BACKEND = "127.0.120", "127.0.121"


def udp_objects(name: str, ip: str, backend: UdpBackend) -> list[dict[str, object]]:
    svc = service(name, ip, 53, port_name="dns", protocol="UDP")
    eps = endpoint_slice(f"{name}-a", name, backend.port, [backend.ip], port_name="dns")
    for port in eps["ports"]:
        port["protocol"] = "UDP"
    return [svc, eps]


def tcp_objects(name: str, ip: str, backend_ip: str, backend_port: int) -> list[dict[str, object]]:
    return [
        service(name, ip, 8080),
        endpoint_slice(f"{name}-a", name, backend_port, [backend_ip]),
    ]


def handoff_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    return run / "handoff.sock"


def run_args(manifests: Path, sock: Path, *extra: str) -> list[str]:
    return ["run", "--manifests", str(manifests), "--handoff-socket", str(sock), *extra]


def listening(pid: int) -> set[tuple[str, str, int]]:
    """(tcp|udp, ip, port) of every listening TCP and bound UDP socket of ``pid``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for kind, table in (("tcp", "tcp"), ("tcp", "tcp6"), ("udp", "udp"), ("udp", "udp6")):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode not in inodes or (kind == "tcp" and state != "0A"):
                continue
            hex_ip, hex_port = local.split(":")
            if len(hex_ip) == 8:
                ip = socket.inet_ntop(socket.AF_INET, bytes.fromhex(hex_ip)[::-1])
            else:
                raw = b"".join(bytes.fromhex(hex_ip[i : i + 8])[::-1] for i in range(0, 32, 8))
                ip = socket.inet_ntop(socket.AF_INET6, raw)
            found.add((kind, ip, int(hex_port, 16)))
    return found


class Prober:
    """Opens a connection to ``address`` every 10 ms in a thread and counts those that
    were refused or reset before the echo came back (a handoff must cause none)."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                with socket.create_connection(self.address, timeout=5) as conn:
                    if exchange(conn, b"probe") != b"probe":
                        self.failures.append("no echo")
                        continue
                self.ok += 1
            except OSError as exc:
                self.failures.append(repr(exc))


@dataclass(frozen=True)
class LoadOutcome:
    wrk: WrkResult
    udp_sent: int
    udp_answered: int


def handoffs_under_load(tmp_path: Path, loop: str, host: int) -> LoadOutcome:
    """wrk (Connection: close, 32 connections, 20 s) and a UDP request/reply client
    through a proxy on ``loop``; handoffs at 10 s, 13 s and 16 s; each old process must
    exit 0 by itself, and no log may show an error."""
    ip = f"{SVC}.{host}"
    tmp_path.mkdir()
    sock = handoff_dir(tmp_path)
    udp_backend = UdpBackend(f"{BACKEND}.{host}")
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    try:
        with nginx_http(tmp_path / "nginx", f"{BACKEND}.{host}", 8081) as http:
            write(
                manifests / "svc.json",
                *tcp_objects("web", ip, *http),
                *udp_objects("dns", ip, udp_backend),
            )
            args = run_args(manifests, sock, "--loop", loop, "--shutdown-grace", "3s")
            procs: list[subprocess.Popen[str]] = []
            logs = [tmp_path / f"proxy-{i}.log" for i in range(4)]
            with contextlib.ExitStack() as stack:
                procs.append(stack.enter_context(proxy_process(args, log=logs[0])))
                wait_listening((ip, 8080))
                wait_logged(logs[0], "handoff: listening on")
                started = time.monotonic()
                wrk = start_wrk(f"http://{ip}:8080/", 20)
                with UdpLoad((ip, 53)) as udp:
                    for i, at in enumerate((10, 13, 16), start=1):
                        time.sleep(max(0.0, started + at - time.monotonic()))
                        procs.append(stack.enter_context(proxy_process(args, log=logs[i])))
                        wait_logged(logs[i], "handoff: took over", within=10)
                        wait_logged(logs[i], "handoff: listening on", within=10)
                    result = wrk_result(wrk, timeout=30)
                    sent, answered = udp.stop(settle=1.0)
                for old in procs[:3]:
                    assert old.wait(10) == 0, [log.read_text()[-2000:] for log in logs]
                assert procs[3].poll() is None
                for log in logs:
                    assert_clean_log(log)
                    assert "ERROR" not in log.read_text(), log.read_text()[-3000:]
    finally:
        udp_backend.stop()
    return LoadOutcome(result, sent, answered)


def test_three_handoffs_under_load_refuse_and_lose_nothing_on_both_loops(tmp_path: Path) -> None:
    """Both loops at once (one proxy chain each, on its own addresses, so the suite waits
    20 s, not 40): 0 socket errors, 0 non-2xx, every UDP request answered."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = {
            loop: pool.submit(handoffs_under_load, tmp_path / loop, loop, host)
            for loop, host in (("asyncio", 1), ("uvloop", 2))
        }
        outcomes = {loop: run.result(timeout=90) for loop, run in runs.items()}
    for loop, outcome in outcomes.items():
        assert outcome.wrk.requests > 1000, (loop, outcome.wrk.output)
        assert outcome.wrk.errors == 0, (loop, outcome.wrk.output)
        assert outcome.udp_sent > 5000, (loop, outcome.udp_sent)
        assert outcome.udp_answered == outcome.udp_sent, (loop, outcome)


def test_open_connection_drains_through_the_old_process(tmp_path: Path) -> None:
    """The new process serves its own view (one Service kept, one removed, one added); an
    open connection echoes through the old process until its grace, then is reset; the old
    process reports draining, exits 0 and holds nothing; the new one listens on exactly
    what a fresh start with its configuration does; both count the handoff."""
    sock = handoff_dir(tmp_path)
    backends = [Backend(f"{BACKEND}.{10 + i}", echo) for i in range(3)]
    kept, removed, added = (f"{SVC}.{10 + i}" for i in range(3))
    old_manifests, new_manifests = tmp_path / "old", tmp_path / "new"
    old_manifests.mkdir()
    new_manifests.mkdir()
    write(
        old_manifests / "svc.json",
        *tcp_objects("kept", kept, backends[0].ip, backends[0].port),
        *tcp_objects("removed", removed, backends[1].ip, backends[1].port),
    )
    write(
        new_manifests / "svc.json",
        *tcp_objects("kept", kept, backends[0].ip, backends[0].port),
        *tcp_objects("added", added, backends[2].ip, backends[2].port),
    )
    old_health, new_health, metrics = (f"127.0.120.{n}:{free_port()}" for n in (200, 201, 202))
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    common = ("--shutdown-grace", "3s", "--metrics-bind-address", metrics)
    try:
        with (
            contextlib.ExitStack() as stack,
            proxy_process(
                run_args(old_manifests, sock, *common, "--healthz-bind-address", old_health),
                log=old_log,
            ) as old,
        ):
            wait_logged(old_log, "handoff: listening on")
            held = stack.enter_context(socket.create_connection((kept, 8080), timeout=5))
            assert exchange(held, b"before") == b"before"
            with (
                Prober((kept, 8080)) as prober,
                proxy_process(
                    run_args(new_manifests, sock, *common, "--healthz-bind-address", new_health),
                    log=new_log,
                ) as new,
            ):
                wait_logged(new_log, "handoff: took over 2 of 4 listening sockets")
                handed_off = time.monotonic()
                # The old process drains: /healthz says so, the connection goes on.
                code, body = get(f"http://{old_health}/healthz")
                assert (code, body["draining"]) == (503, True), body
                assert get(f"http://{new_health}/healthz")[0] == 200
                assert exchange(held, b"during the grace") == b"during the grace"
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection((removed, 8080), timeout=5)
                with socket.create_connection((added, 8080), timeout=5) as conn:
                    assert exchange(conn, b"new") == b"new"
                assert old.wait(10) == 0, old_log.read_text()
                drained_for = time.monotonic() - handed_off
                with pytest.raises(ConnectionResetError):
                    exchange(held, b"after the grace")
                taken_over = listening(new.pid)
                # The metrics server's socket is the new process's alone now.
                assert metric(metrics, 'userproxy_handoffs_total{role="taken"}') == 1.0
                prober.stop()
                assert stop_process(new) == 0
            assert prober.failures == [], prober.failures[:5]
            assert prober.ok > 50
        assert 2.5 < drained_for < 6, drained_for
        old_text = old_log.read_text()
        assert "aborted 1 connections still open after the grace period" in old_text
        assert "serves now (2 of 4 sockets taken)" in old_text
        fresh_log = tmp_path / "fresh.log"
        fresh_args = ["run", "--manifests", str(new_manifests), *common]
        fresh_args += ["--healthz-bind-address", new_health]
        with proxy_process(fresh_args, log=fresh_log) as fresh:
            wait_listening((added, 8080))
            wait_logged(fresh_log, "listening on")
            wait_until_listening(fresh.pid, len(taken_over))
            assert listening(fresh.pid) == taken_over
        for log in (old_log, new_log, fresh_log):
            assert_clean_log(log)
    finally:
        for backend in backends:
            backend.stop()


def wait_until_listening(pid: int, count: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while len(listening(pid)) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def metric(address: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


@dataclass(frozen=True)
class OldProxy:
    address: tuple[str, int]
    sock: Path
    log: Path
    proc: subprocess.Popen[str]


@contextlib.contextmanager
def old_proxy(tmp_path: Path, host: int, *extra: str) -> Iterator[OldProxy]:
    """An old proxy with a handoff socket serving an echo Service at 127.0.120.HOST:8080."""
    sock = handoff_dir(tmp_path)
    backend = Backend(f"{BACKEND}.{host}", echo)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    address = (f"{SVC}.{host}", 8080)
    write(manifests / "svc.json", *tcp_objects("echo", address[0], backend.ip, backend.port))
    log = tmp_path / "old.log"
    try:
        with proxy_process(run_args(manifests, sock, *extra), log=log) as proc:
            wait_listening(address)
            wait_logged(log, "handoff: listening on")
            yield OldProxy(address, sock, log, proc)
    finally:
        backend.stop()
    assert_clean_log(log)


def test_a_new_process_that_dies_before_taking_over_changes_nothing(tmp_path: Path) -> None:
    """The new process receives the sockets, cannot sync (its API server does not answer)
    and is killed: the old one served all along and still can hand off."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}
                ],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "users": [{"name": "u", "user": {}}],
                "current-context": "c",
            }
        )
    )
    with old_proxy(tmp_path, 30) as old, Prober(old.address) as prober:
        sock, log = old.sock, old.log
        new_log = tmp_path / "new.log"
        args = ["run", "--kubeconfig", str(kubeconfig), "--handoff-socket", str(sock)]
        with proxy_process(args, log=new_log) as new:
            wait_logged(new_log, "handoff: received 1 listening sockets")
            time.sleep(0.5)  # it serves nothing yet: its first sync never comes
            new.send_signal(signal.SIGKILL)
            new.wait(5)
        wait_logged(log, "handoff: abandoned, this process goes on serving")
        time.sleep(0.3)
        # Still able to hand off: the abandoned exchange left nothing half done.
        manifests = tmp_path / "manifests"
        second_log = tmp_path / "second.log"
        with proxy_process(run_args(manifests, sock), log=second_log):
            wait_logged(second_log, "handoff: took over 1 of 1")
            time.sleep(0.3)
            prober.stop()
    assert prober.failures == [], prober.failures[:5]
    assert prober.ok > 20
