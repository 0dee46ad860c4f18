"""UDP under load, against a ``--loop uvloop`` proxy subprocess (log checked for tracebacks).

* 100 000 datagrams from 5 000 client ports with ``--udp-max-sessions 1000``: the session
  table and the proxy's open descriptors stay bounded, evictions are counted, and the proxy
  keeps answering.
* Fairness: a client flooding the Service is rate-limited (``--udp-session-rate``) and a
  polite client of the same Service keeps being answered.

Every loop is bounded in count and time; all traffic stays on 127.0.0.0/8.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from pathlib import Path

from tests.support.backends import UdpBackend
from tests.support.manifests import write
from tests.support.proxyrun import free_port, open_fds
from tests.udp.dns_backend import (
    DNS_PORT,
    addresses,
    proxy_subprocess,
    scrape,
    udp_objects,
    udp_value,
    wait_answering,
)

MAX_SESSIONS = 1000
CLIENTS = 5000
BATCH = 500  # client sockets open at once (the test's own descriptor budget)
DATAGRAMS = 100_000
#: Descriptors the proxy may open beyond its baseline besides the session sockets.
FD_MARGIN = 16


class FdSampler:
    """Samples /proc/PID/fd every 10 ms in a thread; ``peak`` is the largest count seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = open_fds(pid)
        self.samples = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._done.wait(0.01):
            try:
                self.peak = max(self.peak, open_fds(self.pid))
            except FileNotFoundError:  # the proxy died: the test reports it
                return
            self.samples += 1

    def __enter__(self) -> FdSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)


def run_batch(client_ip: str, address: tuple[str, int], rounds: int) -> tuple[int, int]:
    """BATCH sockets on ``client_ip``; ``rounds`` times, each sends one datagram and the
    replies are collected (up to 1 s a round).  Returns (sent, answered correctly)."""
    socks = []
    try:
        for _ in range(BATCH):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.bind((client_ip, 0))
            sock.setblocking(False)
        by_fd = {sock.fileno(): (i, sock) for i, sock in enumerate(socks)}
        poller = select.poll()
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        sent = answered = 0
        for r in range(rounds):
            for i, sock in enumerate(socks):
                sock.sendto(b"%d:%d" % (i, r), address)
                sent += 1
            got = 0
            deadline = time.monotonic() + 1.0
            while got < BATCH and (left := deadline - time.monotonic()) > 0:
                for fd, _ in poller.poll(left * 1000):
                    i, sock = by_fd[fd]
                    while True:
                        try:
                            data = sock.recv(2048)
                        except BlockingIOError:
                            break
                        got += 1
                        answered += data == b"%d:%d" % (i, r)
        return sent, answered
    finally:
        for sock in socks:
            sock.close()


def test_5000_clients_with_1000_sessions_at_most(tmp_path: Path) -> None:
    cluster_ip, (backend_ip,), client_prefix = addresses(1)
    backend = UdpBackend(backend_ip)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    write(manifests / "udp.json", *udp_objects(cluster_ip, [(backend.ip, backend.port)]))
    address = (cluster_ip, DNS_PORT)
    metrics_port = free_port()
    args = ["--manifests", str(manifests), "--loop", "uvloop",
            "--udp-max-sessions", str(MAX_SESSIONS),
            f"--metrics-bind-address=127.0.0.1:{metrics_port}"]  # fmt: skip
    try:
        with proxy_subprocess(args, tmp_path / "proxy.log") as proc:
            wait_answering(address)  # one session (the warm-up client's)
            time.sleep(0.2)
            baseline = open_fds(proc.pid)
            rounds = DATAGRAMS // CLIENTS
            sent = answered = 0
            started = time.monotonic()
            with FdSampler(proc.pid) as fds:
                # Each batch of BATCH sockets binds a client IP of its own, so the CLIENTS
                # (ip, port) pairs are distinct even if the kernel reuses ephemeral ports.
                for batch in range(CLIENTS // BATCH):
                    s, a = run_batch(f"{client_prefix}.{batch + 1}", address, rounds)
                    sent, answered = sent + s, answered + a
                    assert proc.poll() is None, "the proxy died"
            elapsed = time.monotonic() - started
            samples = scrape(metrics_port)
            wait_answering(address, b"final", within=2.0)
            assert proc.poll() is None, "the proxy died"
            final = scrape(metrics_port)
    finally:
        backend.stop()
    created = udp_value(samples, "userproxy_udp_sessions_created_total")
    evicted = udp_value(samples, "userproxy_udp_sessions_evicted_total")
    expired = udp_value(samples, "userproxy_udp_sessions_expired_total")
    active = udp_value(samples, "userproxy_udp_sessions_active")
    print(
        f"{sent} datagrams from {CLIENTS} clients in {elapsed:.1f}s ({sent / elapsed:.0f}/s), "
        f"{answered} answered ({answered / sent:.2%}); proxy fds: baseline {baseline}, peak "
        f"{fds.peak} ({fds.samples} samples); sessions created {created:.0f}, evicted "
        f"{evicted:.0f}, expired {expired:.0f}, active {active:.0f}; backend got "
        f"{backend.received}"
    )
    assert sent == DATAGRAMS
    assert fds.peak <= baseline + MAX_SESSIONS + FD_MARGIN
    assert active <= MAX_SESSIONS
    assert evicted >= CLIENTS - MAX_SESSIONS
    assert created >= CLIENTS  # (+1: the warm-up client)
    assert created - evicted - expired == active  # every session accounted for
    assert udp_value(final, "userproxy_udp_sessions_active") <= MAX_SESSIONS
    # The proxy kept answering: (almost) every datagram, and a fresh client at the end.
    assert answered >= 0.99 * sent


SESSION_RATE = 2000
POLITE_QUERIES = 200


def test_a_flooding_client_does_not_starve_a_polite_one(tmp_path: Path) -> None:
    """One client sends as fast as it can (bounded: 5 s, 2 000 000 datagrams) while another
    sends POLITE_QUERIES datagrams 10 ms apart, each waiting up to 0.3 s for its answer."""
    cluster_ip, (backend_ip,), client_prefix = addresses(1)
    backend = UdpBackend(backend_ip)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    write(manifests / "udp.json", *udp_objects(cluster_ip, [(backend.ip, backend.port)]))
    address = (cluster_ip, DNS_PORT)
    metrics_port = free_port()
    args = ["--manifests", str(manifests), "--loop", "uvloop",
            "--udp-session-rate", str(SESSION_RATE),
            f"--metrics-bind-address=127.0.0.1:{metrics_port}"]  # fmt: skip
    flood_sent = 0
    flood_seconds = 0.0
    polite_done = threading.Event()

    def flood() -> None:
        nonlocal flood_sent, flood_seconds
        payload = b"f" * 64
        started = time.monotonic()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((f"{client_prefix}.1", 0))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # replies: dropped
            for i in range(2_000_000):
                sock.sendto(payload, address)
                if i % 1000 == 0 and (polite_done.is_set() or time.monotonic() - started > 5):
                    break
            flood_sent = i + 1
        flood_seconds = time.monotonic() - started

    try:
        with proxy_subprocess(args, tmp_path / "proxy.log") as proc:
            wait_answering(address)
            flooder = threading.Thread(target=flood)
            flooder.start()
            answered = 0
            try:
                time.sleep(0.2)  # the flood is on
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.bind((f"{client_prefix}.2", 0))
                    sock.settimeout(0.3)
                    for i in range(POLITE_QUERIES):
                        question = b"polite %d" % i
                        sock.sendto(question, address)
                        deadline = time.monotonic() + 0.3
                        while time.monotonic() < deadline:  # skip late answers to earlier ones
                            try:
                                if sock.recv(2048) == question:
                                    answered += 1
                                    break
                            except TimeoutError:
                                break
                        time.sleep(0.01)
            finally:
                polite_done.set()
                flooder.join(timeout=10)
            assert not flooder.is_alive()
            assert proc.poll() is None, "the proxy died"
            samples = scrape(metrics_port)
    finally:
        backend.stop()
    rate_limited = udp_value(samples, "userproxy_udp_drops_total", reason="rate_limit")
    forwarded = udp_value(samples, "userproxy_udp_datagrams_total", direction="upstream")
    print(
        f"flooder sent {flood_sent} in {flood_seconds:.1f}s ({flood_sent / flood_seconds:.0f}/s); "
        f"rate_limit drops {rate_limited:.0f}; forwarded {forwarded:.0f}; polite client "
        f"answered {answered}/{POLITE_QUERIES}; backend got {backend.received}"
    )
    assert answered >= 0.95 * POLITE_QUERIES
    assert rate_limited > 0
