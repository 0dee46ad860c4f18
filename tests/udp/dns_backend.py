"""Support for the UDP acceptance tests: a real DNS server backend (dnslib, in threads of
the test process), the zone it serves and the answers it must give, Service/EndpointSlice
builders for a UDP Service, a subprocess proxy with a log file, and a /metrics scraper.

The zone's answers depend only on the name, so any reply can be checked; each backend
answers with its own TTL (``ttl``), so a reply says which endpoint served it.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
from dnslib import RCODE, RR, TXT, A  # type: ignore[import-untyped]
from dnslib.server import DNSLogger, DNSServer  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families

from tests.support.manifests import endpoint_slice, fresh_net, service
from tests.support.proxyrun import assert_clean_log, proxy_process

#: The Service port clients query (port 53: the tests run as root).
DNS_PORT = 53
SERVICE = "dns"
#: The totals/metrics label of the Service port.
SERVICE_PORT = f"default/{SERVICE}:dns"

#: Names with one A record each.
ZONE: dict[str, str] = {f"host{i}.svc.test.": f"10.53.{i // 250}.{i % 250 + 1}" for i in range(40)}
#: A name with 60 A records: a reply of over 1 000 bytes.
MANY = "many.svc.test."
MANY_ADDRESSES = tuple(f"10.54.0.{i + 1}" for i in range(60))
#: A name with a TXT record of 16 strings of 250 bytes: a 4 000-byte answer (EDNS 4096).
BIG = "big.svc.test."
BIG_TXT = tuple(bytes([65 + i]) * 250 for i in range(16))


def expected_a(name: str) -> set[str]:
    if name == MANY:
        return set(MANY_ADDRESSES)
    return {ZONE[name]}


class _Resolver:
    """dnslib's resolver interface (duck-typed: dnslib has no type hints)."""

    def __init__(self, backend: DnsBackend) -> None:
        self.backend = backend

    def resolve(self, request: Any, handler: Any) -> Any:
        backend = self.backend
        with backend.lock:
            backend.received += 1
        reply = request.reply()
        name = str(request.q.qname)
        qtype = request.q.qtype
        ttl = backend.ttl
        if name == BIG and qtype == 16:  # TXT
            reply.add_answer(RR(name, 16, rdata=TXT(list(BIG_TXT)), ttl=ttl))
        elif name == MANY and qtype == 1:  # A
            for address in MANY_ADDRESSES:
                reply.add_answer(RR(name, 1, rdata=A(address), ttl=ttl))
        elif name in ZONE and qtype == 1:
            reply.add_answer(RR(name, 1, rdata=A(ZONE[name]), ttl=ttl))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


class DnsBackend:
    """A dnslib DNSServer (UDP) on ``ip``, an ephemeral port, in a thread.

    ``received`` counts the queries it answered; ``stop()`` closes its socket (after
    which the kernel answers datagrams to its port with ICMP port unreachable).
    """

    def __init__(self, ip: str, ttl: int) -> None:
        self.ip = ip
        self.ttl = ttl
        self.received = 0
        self.lock = threading.Lock()
        quiet = DNSLogger("-recv,-send,-request,-reply,-truncated,-error,-data", prefix=False)
        self._server = DNSServer(_Resolver(self), address=ip, port=0, logger=quiet)
        self._server.server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.port: int = self._server.server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self._stopped = False

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.server.shutdown()
        self._thread.join(timeout=5)
        self._server.server.server_close()


def addresses(count: int) -> tuple[str, list[str], str]:
    """A fresh cluster IP, ``count`` backend IPs and a client-address prefix (add ``.N``)."""
    net = fresh_net()
    cluster_ip = f"127.{net // 200 + 100}.{net % 200}.1"
    backends = [f"127.{net // 200 + 150}.{net % 200}.{i + 1}" for i in range(count)]
    return cluster_ip, backends, f"127.{net // 200 + 200}.{net % 200}"


def udp_objects(
    cluster_ip: str, endpoints: Sequence[tuple[str, int]], port: int = DNS_PORT
) -> list[dict[str, Any]]:
    """A UDP Service ``dns`` (port named ``dns``) and one EndpointSlice per endpoint."""
    svc = service(SERVICE, cluster_ip, port, port_name="dns")
    svc["spec"]["ports"][0]["protocol"] = "UDP"
    objects = [svc]
    for ip, target in endpoints:
        eps = endpoint_slice(f"{SERVICE}-{ip}-{target}", SERVICE, target, [ip], port_name="dns")
        eps["ports"][0]["protocol"] = "UDP"
        objects.append(eps)
    return objects


def query_a(
    sock: socket.socket,
    address: tuple[str, int],
    name: str,
    timeout: float = 2.0,
    *,
    skip_stale: bool = False,
) -> dns.message.Message:
    """One A query from ``sock``.  dnspython checks that the reply comes from ``address``
    (the service address and port) and answers this query (id and question); with
    ``skip_stale`` it skips replies to earlier queries (that timed out) instead of failing."""
    sock.setblocking(False)  # dnspython's timeout needs a non-blocking socket
    query = dns.message.make_query(name, dns.rdatatype.A)
    return dns.query.udp(
        query, address[0], port=address[1], timeout=timeout, sock=sock, ignore_errors=skip_stale
    )


def a_answer_error(reply: dns.message.Message, name: str) -> str | None:
    """What is wrong with ``reply`` to an A query for ``name`` (None: it is right)."""
    if reply.rcode() != dns.rcode.NOERROR:
        return f"{name}: rcode {dns.rcode.to_text(reply.rcode())}"
    if reply.flags & dns.flags.TC:
        return f"{name}: truncated"
    if len(reply.answer) != 1:
        return f"{name}: {len(reply.answer)} answer RRsets"
    rrset = reply.answer[0]
    if rrset.name.to_text() != name or rrset.rdtype != dns.rdatatype.A:
        return f"{name}: answer for {rrset.name} type {rrset.rdtype}"
    got = {rdata.to_text() for rdata in rrset}
    if got != expected_a(name):
        return f"{name}: addresses {sorted(got)}"
    return None


def ttl_of(reply: dns.message.Message) -> int:
    """The answer's TTL, i.e. the ``ttl`` of the backend that answered."""
    return int(reply.answer[0].ttl)


# -- a proxy subprocess -----------------------------------------------------------------------
@contextlib.contextmanager
def proxy_subprocess(args: Sequence[str], log_path: Path) -> Iterator[subprocess.Popen[str]]:
    """``python -m userproxy run ARGS`` with its output in ``log_path``; SIGTERM (then
    SIGKILL) and reaped at exit; fails if the log shows a traceback."""
    repo = Path(__file__).parents[2]
    with proxy_process(["run", "--log-level", "warning", *args], repo, log=log_path) as proc:
        yield proc
    assert_clean_log(log_path)


def wait_answering(
    address: tuple[str, int], payload: bytes = b"ping", within: float = 10.0
) -> None:
    """Send ``payload`` every 0.1 s until something answers (for a starting proxy)."""
    deadline = time.monotonic() + within
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.1)
        while time.monotonic() < deadline:
            sock.sendto(payload, address)
            try:
                sock.recvfrom(65535)
                return
            except OSError:  # timeout, or ICMP refusal before the proxy listens
                time.sleep(0.05)
    raise AssertionError(f"nothing answered at {address} within {within}s")


def wait_dns_answering(address: tuple[str, int], within: float = 10.0) -> None:
    """A proper DNS query every 0.1 s until one is answered."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                query_a(sock, address, next(iter(ZONE)), timeout=0.2)
                return
            except (OSError, dns.exception.Timeout):
                time.sleep(0.05)
    raise AssertionError(f"no DNS answer at {address} within {within}s")


# -- metrics ----------------------------------------------------------------------------------
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of http://127.0.0.1:PORT/metrics by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def udp_value(samples: Samples, name: str, **labels: str) -> float:
    """A sample of the ``dns`` Service port (protocol UDP); missing: an AssertionError."""
    key = (name, tuple(sorted({"service_port": SERVICE_PORT, "protocol": "UDP", **labels}.items())))
    assert key in samples, f"no sample {key}"
    return samples[key]
