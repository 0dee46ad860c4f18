"""``userproxy connect`` end to end, on both loops side by side, against the fake API
server and its pod port-forward (tests/connect/cluster.py): names (hosts file and DNS,
asked through the C library and dnspython), balancing over every ready pod, following
slice changes within a second, 10 MB through the port-forward, a pod's reset passed on as
a reset, a 10 s API outage, the hosts block removed at exit and after a crash."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import dns.resolver
import pytest

from tests.connect.cluster import (
    Connect,
    FakeCluster,
    connect_process,
    fake_cluster,
    http_by_name,
    resolve_by_hosts_file,
    unprivileged_prefix,
)
from tests.support.backends import echo_through
from tests.support.proxyrun import assert_clean_log, free_port, wait_logged

pytestmark = pytest.mark.timeout(180)

LOOPS = {"asyncio": 134, "uvloop": 135}
NAMES = ("web", "web.default", "web.default.svc", "web.default.svc.cluster.local")


def _dns(child: Connect, name: str, *, tcp: bool = False) -> str:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [child.dns[0]]
    resolver.port = child.dns[1]
    resolver.lifetime = 3.0
    return str(resolver.resolve(name, "A", tcp=tcp)[0])


def _read_until_end(address: tuple[str, int]) -> tuple[int, str]:
    """(bytes read, how the stream ended: "reset" or "eof")."""
    total = 0
    try:
        with socket.create_connection(address, timeout=10) as sock:
            while data := sock.recv(1 << 16):
                total += len(data)
    except ConnectionResetError:
        return total, "reset"
    return total, "eof"


async def _check_names(child: Connect) -> str:
    """Every name of web resolves to one address, by DNS (UDP and TCP) and the hosts file;
    a name of another namespace's Service and an unknown name do not."""
    address = child.address("web.default")
    for name in NAMES:
        assert await asyncio.to_thread(_dns, child, name) == address
    assert await asyncio.to_thread(_dns, child, "web.default", tcp=True) == address
    with pytest.raises(dns.resolver.NoNameservers):  # REFUSED: not ours to answer
        await asyncio.to_thread(_dns, child, "example.com")
    with pytest.raises(dns.resolver.NoNameservers):
        await asyncio.to_thread(_dns, child, "other.team")  # -n default only
    found = await asyncio.to_thread(resolve_by_hosts_file, child.hosts, [*NAMES, "db.default"])
    assert {found[name] for name in NAMES} == {address}
    assert found["db.default"] == child.address("db.default")
    return address


async def _bodies(child: Connect, count: int) -> Counter[str]:
    return Counter(await asyncio.to_thread(http_by_name, child.hosts, "http://web.default/", count))


async def _first_seen(child: Connect, pod: str, within: float) -> float:
    """Seconds until a new connection by name reaches ``pod`` (one request per try)."""
    start = time.monotonic()
    address = (child.address("web.default"), 80)
    while time.monotonic() - start < within:
        body = await asyncio.to_thread(_get, address)
        if body == pod:
            return time.monotonic() - start
    raise AssertionError(f"{pod} got no connection within {within}s")


def _get(address: tuple[str, int]) -> str:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: web.default\r\n\r\n")
        reply = b""
        while data := sock.recv(4096):
            reply += data
    return reply.partition(b"\r\n\r\n")[2].decode()


async def test_connect_end_to_end_on_both_loops(tmp_path: Path) -> None:
    async with fake_cluster() as cluster:
        kubeconfig = cluster.api.kubeconfig(tmp_path / "kubeconfig")
        original_hosts = "127.0.0.1\tlocalhost\n# the user's own line\n"
        with contextlib.ExitStack() as stack:
            children = {
                loop: stack.enter_context(
                    connect_process(
                        tmp_path, kubeconfig, loop=loop, net=net, hosts_text=original_hosts
                    )
                )
                for loop, net in LOOPS.items()
            }
            for child in children.values():
                await asyncio.to_thread(child.summary)
            await _scenario(cluster, children)
            for loop, child in children.items():
                child.proc.send_signal(signal.SIGINT)
                assert await asyncio.to_thread(child.proc.wait, 15) == 0, loop
                assert child.hosts.read_text() == original_hosts, loop
                assert_clean_log(child.log)


async def _scenario(cluster: FakeCluster, children: dict[str, Connect]) -> None:
    both = children.values()
    # Names, and the summary: UDP listed as not forwardable, another namespace not served.
    for child in both:
        await _check_names(child)
        text = child.log.read_text()
        assert "dns.default: 53/UDP: not forwardable" in text
        assert "other.team" not in text
    # Every ready pod gets requests, not only the first.
    for loop, child in children.items():
        bodies = await _bodies(child, 30)
        print(f"{loop}: 30 requests by name: {dict(sorted(bodies.items()))}")
        assert set(bodies) == {"web-1", "web-2", "web-3"}, loop
    # A pod removed from the slice gets no new connection 1 s after the change.
    cluster.set_web(1, 2)
    await asyncio.sleep(1.0)
    for loop, child in children.items():
        assert set(await _bodies(child, 20)) == {"web-1", "web-2"}, loop
    # A new pod gets connections within a second of the slice change.
    cluster.set_web(1, 2, 4)
    seen = await asyncio.gather(*(_first_seen(c, "web-4", 1.0) for c in both))
    print("a new pod's first connection, s after the slice change:", [round(t, 3) for t in seen])
    assert max(seen) < 1.0, seen
    for child in both:  # the summary is printed again with the pods now ready
        await asyncio.to_thread(wait_logged, child.log, "web-1 web-2 web-4")
    # 10 MB through the port-forward, the same SHA-256 both ways.
    payload = os.urandom(10 << 20)
    for loop, child in children.items():
        echoed = await asyncio.to_thread(echo_through, (child.address("db.default"), 5432), payload)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest(), loop
    # A pod that resets mid-stream: the client sees a reset after what was sent.
    for loop, child in children.items():
        total, end = await asyncio.to_thread(
            _read_until_end, (child.address("flaky.default"), 7000)
        )
        assert end == "reset", (loop, total)
    # An API outage of 10 s: the children keep running; once it is back they follow
    # the cluster again (a new pod) and serve by name.
    await cluster.api.stop()
    await asyncio.sleep(10)
    for loop, child in children.items():
        assert child.proc.poll() is None, loop
    await cluster.api.start()
    cluster.set_web(1, 5)
    seen = await asyncio.gather(*(_first_seen(c, "web-5", 15.0) for c in both))
    print("after the 10 s outage, a new pod served after (s):", [round(t, 3) for t in seen])
    for loop, child in children.items():
        assert set(await _bodies(child, 10)) == {"web-1", "web-5"}, (loop, seen)


async def test_hosts_block_left_by_a_crash_is_replaced_and_removed(tmp_path: Path) -> None:
    async with fake_cluster() as cluster:
        kubeconfig = cluster.api.kubeconfig(tmp_path / "kubeconfig")
        original = "127.0.0.1\tlocalhost\n"
        with connect_process(tmp_path, kubeconfig, loop="uvloop", net=136) as child:
            await asyncio.to_thread(child.summary)
            await asyncio.to_thread(wait_logged, child.hosts, "web.default.svc.cluster.local")
            child.proc.kill()  # a crash: nothing removes the block
            await asyncio.to_thread(child.proc.wait, 10)
        stale = child.hosts.read_text()
        assert "# BEGIN userproxy connect" in stale
        cluster.api.delete("services", "db")
        with connect_process(tmp_path, kubeconfig, loop="asyncio", net=136) as again:
            await asyncio.to_thread(again.summary)
            await asyncio.to_thread(wait_logged, again.hosts, "web.default.svc.cluster.local")
            text = again.hosts.read_text()
            assert text.count("# BEGIN userproxy connect") == 1
            assert "db.default" not in text  # nothing of the crashed run's block is left
            assert "removed the block an earlier run left behind" in again.log.read_text()
            again.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(again.proc.wait, 15) == 0
        assert again.hosts.read_text() == original


async def test_an_unprivileged_user_gets_dns_and_port_80_on_the_offset_port() -> None:
    """As uid 65534 without capabilities (unprivileged_prefix): the DNS responder answers
    (on 5353) and web's port 80 is served on 80 + 10000, as the header says; nothing
    listens on 80."""
    work = Path(tempfile.mkdtemp(prefix="userproxy-connect-"))  # not under pytest's 0700
    try:
        os.chmod(work, 0o755)
        async with fake_cluster() as cluster:
            kubeconfig = cluster.api.kubeconfig(work / "kubeconfig")
            kubeconfig.chmod(0o644)
            prefix = unprivileged_prefix(work)
            with connect_process(work, kubeconfig, loop="uvloop", net=137, prefix=prefix) as child:
                await asyncio.to_thread(child.summary)
                text = child.log.read_text()
                assert "ports below 1024 are served 10000 higher" in text, text
                assert "80->10080" in text
                address = await asyncio.to_thread(_dns, child, "web.default")
                assert address == child.address("web.default")
                reached = await asyncio.to_thread(_get, (address, 10080))
                assert reached in {"web-1", "web-2", "web-3"}
                with pytest.raises(ConnectionRefusedError):
                    await asyncio.to_thread(_get, (address, 80))
                child.proc.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(child.proc.wait, 15) == 0
            assert_clean_log(child.log)
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def test_the_status_page_metrics_and_access_log_work_as_in_run(tmp_path: Path) -> None:
    """The admin flags of ``run``: /status lists the local Services and their pods,
    /metrics counts the connections, the access log has a line per connection naming
    the pod's address."""
    port = free_port()
    access = tmp_path / "access.log"
    args = ["--metrics-bind-address", f"127.0.0.1:{port}", "--access-log", str(access)]
    async with fake_cluster() as cluster, aiohttp.ClientSession() as session:
        kubeconfig = cluster.api.kubeconfig(tmp_path / "kubeconfig")
        with connect_process(tmp_path, kubeconfig, loop="asyncio", net=139, args=args) as child:
            await asyncio.to_thread(child.summary)
            address = (child.address("web.default"), 80)
            bodies = [await asyncio.to_thread(_get, address) for _ in range(6)]
            assert set(bodies) == {"web-1", "web-2", "web-3"}
            async with session.get(f"http://127.0.0.1:{port}/status") as response:
                status = await response.json()
            names = {s["name"] for s in status["services"]}
            assert {"web", "db", "flaky"} <= names
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                metrics = await response.text()
            assert "userproxy_connections_accepted_total" in metrics
            lines = await asyncio.to_thread(wait_logged, access, "127.0.131.", count=6)
            assert lines.count(f"{address[0]}:80") >= 6, lines
            child.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(child.proc.wait, 15) == 0
        assert_clean_log(child.log)


async def test_direct_connects_to_the_pod_ips(tmp_path: Path) -> None:
    """``--direct``: the pods' IPs are dialed (the API server's port-forward knows no pod
    here, so it could not have been used), and an endpoint without a pod serves too."""
    async with fake_cluster() as cluster:
        cluster.set_web(1, podless=[2])
        cluster.add_pod("web-2", 2)  # listening, but named in no targetRef
        cluster.api.pods.clear()
        kubeconfig = cluster.api.kubeconfig(tmp_path / "kubeconfig")
        args = ["--direct"]
        with connect_process(tmp_path, kubeconfig, loop="uvloop", net=140, args=args) as child:
            await asyncio.to_thread(child.summary)
            assert "connecting to the pods' IPs (--direct)" in child.log.read_text()
            address = (child.address("web.default"), 80)
            bodies = {await asyncio.to_thread(_get, address) for _ in range(6)}
            assert bodies == {"web-1", "web-2"}
            child.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(child.proc.wait, 15) == 0
        assert_clean_log(child.log)


def _end_when_the_pod_goes(address: tuple[str, int], cluster: FakeCluster) -> float:
    """Echo through ``address``, stop db-0's servers, and the seconds until the client's
    connection ended (FIN or RST)."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
        for backend in cluster.pods["db-0"]:
            backend.stop()  # the pod is gone: its connections are closed
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(4096) == b""
        return time.monotonic() - started


async def test_a_pod_that_dies_ends_its_connections_and_nothing_leaks(tmp_path: Path) -> None:
    """An open connection to a pod that goes away ends (no hang); 60 connections later
    the child holds as many descriptors as before them (the bridge's pairs, WebSockets
    and relays are all closed)."""
    async with fake_cluster() as cluster:
        kubeconfig = cluster.api.kubeconfig(tmp_path / "kubeconfig")
        with connect_process(tmp_path, kubeconfig, loop="uvloop", net=141) as child:
            await asyncio.to_thread(child.summary)
            web = (child.address("web.default"), 80)
            await asyncio.to_thread(_get, web)  # the port-forward's client session is made
            before = len(os.listdir(f"/proc/{child.proc.pid}/fd"))
            for _ in range(60):
                await asyncio.to_thread(_get, web)
            db = (child.address("db.default"), 5432)
            ended_after = await asyncio.to_thread(_end_when_the_pod_goes, db, cluster)
            assert ended_after < 5, ended_after
            await asyncio.sleep(0.5)
            after = len(os.listdir(f"/proc/{child.proc.pid}/fd"))
            assert after <= before, (before, after)
            child.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(child.proc.wait, 15) == 0
        assert_clean_log(child.log)
