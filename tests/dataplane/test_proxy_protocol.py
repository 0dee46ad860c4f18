"""The PROXY protocol header (HAProxy's doc/proxy-protocol.txt): its encoding, the
annotation through planning, and the header on real connections through the proxy.

Three layers:

- table tests of the pure encoders against byte strings written out from the spec, and a
  property test through this file's own parser (independent of the encoder);
- planning: the annotation lands on the TCP listeners only, a bad value warns once;
- the data path on both loops: a backend in a thread records what it receives; the client
  binds its own 127.212.N.77 address, so the header's source is the client and not the
  proxy (which dials from 127.0.0.1).  Real receivers (HAProxy, nginx) are in
  test_proxy_protocol_receivers.py.

Addresses: 127.212.0.0/16 is this file's (Service 127.212.N.1, backends 127.212.N.10,
clients 127.212.N.77), and ::1 for IPv6.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.backends import Backend, UdpBackend, recv_all
from tests.support.manifests import endpoint_slice, service, write
from tests.support.model import DNS, DNS_TARGET, HTTP, eps, sep, svc
from tests.support.proxyrun import running_proxy, wait_for_sync
from userproxy.control.plan import NodeView, plan_service
from userproxy.dataplane.proxy_protocol import (
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    encode_v1,
    encode_v2,
    proxy_header,
)
from userproxy.model import Protocol, ProxyProtocolVersion

SERVICE_PORT = 8080
ANNOTATION = "userproxy.io/proxy-protocol"
# A per-process start, so two runs of this file at once rarely share a net.
_nets = itertools.count(1 + (os.getpid() % 20) * 10)

Address = tuple[str, int]


# ---------------------------------------------------------------- an independent parser


def parse(data: bytes) -> tuple[str, Address | None, Address | None, bytes]:
    """(kind, source, destination, rest) of a PROXY header at the start of ``data``: kind
    is "TCP4"/"TCP6"/"UNKNOWN" for v1, "v2-TCP4"/"v2-TCP6"/"v2-LOCAL" for v2.  Written from
    the spec, not from the encoder: it is what the tests check the encoder against."""
    if data.startswith(V2_SIGNATURE):
        ver_cmd, fam, length = struct.unpack_from("!BBH", data, 12)
        body, rest = data[16 : 16 + length], data[16 + length :]
        assert len(body) == length, "v2 header cut short"
        if ver_cmd == 0x20:
            return "v2-LOCAL", None, None, rest
        assert ver_cmd == 0x21, hex(ver_cmd)
        family, size, kind = {
            0x11: (socket.AF_INET, 4, "v2-TCP4"),
            0x21: (socket.AF_INET6, 16, "v2-TCP6"),
        }[fam]
        assert length == 2 * size + 4
        src = socket.inet_ntop(family, body[:size])
        dst = socket.inet_ntop(family, body[size : 2 * size])
        sport, dport = struct.unpack_from("!HH", body, 2 * size)
        return kind, (src, sport), (dst, dport), rest
    line, sep_, rest = data.partition(b"\r\n")
    assert sep_, data[:120]
    assert data.startswith(b"PROXY "), data[:120]
    assert len(line) + 2 <= V1_MAX_LENGTH
    fields = line.decode("ascii").split(" ")
    if fields[1] == "UNKNOWN":
        return "UNKNOWN", None, None, rest
    _, proto, src_ip, dst_ip, sport, dport = fields
    assert proto in ("TCP4", "TCP6")
    for port in (sport, dport):
        assert port == str(int(port)), "ports are plain decimals"
    return proto, (src_ip, int(sport)), (dst_ip, int(dport)), rest


# ---------------------------------------------------------------- the encoders, by table

V2_HEAD = V2_SIGNATURE.hex()
# 16-byte addresses, spelt out in hex: fd00::1, fd00::a, fe80::1, fe80::2.
FD00_1 = "fd00" + "00" * 13 + "01"
FD00_A = "fd00" + "00" * 13 + "0a"
FE80_1 = "fe80" + "00" * 13 + "01"
FE80_2 = "fe80" + "00" * 13 + "02"
UNKNOWN_V2 = V2_HEAD + "20000000"  # version 2, LOCAL, AF_UNSPEC, no addresses


@pytest.mark.parametrize(
    ("source", "destination", "v1", "v2"),
    [
        (
            ("10.0.0.1", 56324),
            ("10.96.0.10", 443),
            b"PROXY TCP4 10.0.0.1 10.96.0.10 56324 443\r\n",
            V2_HEAD + "2111000c" + "0a000001" + "0a60000a" + "dc04" + "01bb",
        ),
        (
            ("fd00::1", 1),
            ("fd00::a", 80),
            b"PROXY TCP6 fd00::1 fd00::a 1 80\r\n",
            V2_HEAD + "21210024" + FD00_1 + FD00_A + "0001" + "0050",
        ),
        (  # the canonical spelling, whatever the socket layer gave
            ("FD00:0:0::1", 0),
            ("fd00::0a", 65535),
            b"PROXY TCP6 fd00::1 fd00::a 0 65535\r\n",
            V2_HEAD + "21210024" + FD00_1 + FD00_A + "0000" + "ffff",
        ),
        (  # a dual-stack socket's view of an IPv4 client: the client is IPv4
            ("::ffff:10.0.0.1", 5),
            ("::FFFF:10.96.0.10", 80),
            b"PROXY TCP4 10.0.0.1 10.96.0.10 5 80\r\n",
            V2_HEAD + "2111000c" + "0a000001" + "0a60000a" + "0005" + "0050",
        ),
        (  # link-local with a zone: the zone is the proxy's business, not the backend's
            ("fe80::1%eth0", 5),
            ("fe80::2%2", 80),
            b"PROXY TCP6 fe80::1 fe80::2 5 80\r\n",
            V2_HEAD + "21210024" + FE80_1 + FE80_2 + "0005" + "0050",
        ),
        # Unknown: the receiver then uses the connection's own addresses (the spec's rule).
        (("10.0.0.1", 5), ("fd00::1", 80), b"PROXY UNKNOWN\r\n", UNKNOWN_V2),
        (("", 0), ("", 0), b"PROXY UNKNOWN\r\n", UNKNOWN_V2),
        (("web.example", 5), ("10.0.0.1", 80), b"PROXY UNKNOWN\r\n", UNKNOWN_V2),
        (("10.0.0.256", 5), ("10.0.0.1", 80), b"PROXY UNKNOWN\r\n", UNKNOWN_V2),
        (("10.0.0.01", 5), ("10.0.0.1", 80), b"PROXY UNKNOWN\r\n", UNKNOWN_V2),
        ((" 10.0.0.1", 5), ("10.0.0.1", 80), b"PROXY UNKNOWN\r\n", UNKNOWN_V2),
        (("10.0.0.1", 70000), ("10.0.0.2", 80), b"PROXY UNKNOWN\r\n", UNKNOWN_V2),
        (("10.0.0.1", -1), ("10.0.0.2", 80), b"PROXY UNKNOWN\r\n", UNKNOWN_V2),
    ],
    ids=[
        "ipv4",
        "ipv6",
        "ipv6-spelling",
        "ipv4-mapped",
        "ipv6-zone",
        "mixed-families",
        "no-address",
        "not-an-ip",
        "bad-octet",
        "leading-zero",
        "space",
        "port-too-big",
        "port-negative",
    ],
)
def test_encoding(source: Address, destination: Address, v1: bytes, v2: str) -> None:
    assert encode_v1(source, destination) == v1
    assert encode_v2(source, destination) == bytes.fromhex(v2)
    assert proxy_header("v1", source, destination) == v1
    assert proxy_header("v2", source, destination) == bytes.fromhex(v2)


def test_longest_v1_header_fits_the_spec_limit() -> None:
    widest = ":".join(["ffff"] * 8)
    header = encode_v1((widest, 65535), (widest, 65535))
    assert header.startswith(b"PROXY TCP6 ffff:")
    assert len(header) <= V1_MAX_LENGTH


ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str).filter(lambda ip: not ip.startswith("::ffff:"))


@given(
    family=st.sampled_from(["4", "6"]),
    data=st.data(),
    sport=ports,
    dport=ports,
    version=st.sampled_from(["v1", "v2"]),
    payload=st.binary(max_size=64),
)
def test_round_trip_through_an_independent_parser(  # noqa: PLR0917 (hypothesis' draws)
    family: str, data: st.DataObject, sport: int, dport: int, version: str, payload: bytes
) -> None:
    addresses = ipv4 if family == "4" else ipv6
    src, dst = data.draw(addresses), data.draw(addresses)
    header = proxy_header("v2" if version == "v2" else "v1", (src, sport), (dst, dport))
    kind, source, destination, rest = parse(header + payload)
    expected = f"TCP{family}" if version == "v1" else f"v2-TCP{family}"
    assert (kind, source, destination, rest) == (expected, (src, sport), (dst, dport), payload)


# ---------------------------------------------------------------- planning


Versions = dict[Protocol, set[ProxyProtocolVersion | None]]


def _plan_versions(value: str | None, name: str) -> Versions:
    service = dataclasses.replace(svc(name, ports=(HTTP, DNS)), proxy_protocol=value)
    slices = [eps(f"{name}-1", name, sep("10.1.0.1"), more_ports=(DNS_TARGET,))]
    plan = plan_service(service, slices, NodeView("node-a"), "round-robin")
    versions: Versions = {}
    for spec in plan.listeners:
        versions.setdefault(spec.spn.protocol, set()).add(spec.proxy_protocol)
    return versions


@pytest.mark.parametrize("value", ["v1", "v2"])
def test_annotation_reaches_tcp_listeners_only(value: str) -> None:
    # UDP gets no header: the listener spec says so, not the UDP data path.
    assert _plan_versions(value, f"pp-plan-{value}") == {
        Protocol.TCP: {value},
        Protocol.UDP: {None},
    }


def test_no_annotation_no_header() -> None:
    assert _plan_versions(None, "pp-plan-none") == {Protocol.TCP: {None}, Protocol.UDP: {None}}


def test_bad_value_warns_once_naming_service_and_value(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="userproxy.control.plan"):
        for _ in range(3):  # planned at every sync that touches the Service
            assert _plan_versions("v3", "pp-plan-bad") == {
                Protocol.TCP: {None},
                Protocol.UDP: {None},
            }
        _plan_versions("proxy", "pp-plan-bad")
    lines = [r.getMessage() for r in caplog.records if r.name == "userproxy.control.plan"]
    assert len(lines) == 2, lines
    assert "default/pp-plan-bad" in lines[0], lines
    assert "'v3'" in lines[0]
    assert "userproxy.io/proxy-protocol" in lines[0]
    assert "no PROXY protocol header" in lines[0]
    assert "'proxy'" in lines[1]


# ---------------------------------------------------------------- through the proxy


class Recorder:
    """A backend handler: optional greeting on accept (a server-first protocol), then read
    to EOF; record (the proxy's address as seen, every byte received); answer ``ok``."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.seen: list[tuple[Address, bytes]] = []

    def __call__(self, conn: socket.socket) -> None:
        if self.greeting:
            conn.sendall(self.greeting)
        data = recv_all(conn)
        self.seen.append((conn.getpeername()[:2], data))  # before the answer: no race
        conn.sendall(b"ok")
        conn.shutdown(socket.SHUT_WR)


def talk(
    address: Address, source: str, payload: bytes, *, greeting: bool = False
) -> tuple[Address, bytes]:
    """Connect from ``source``, (read the greeting line first), send ``payload`` and EOF;
    (the client's own address, everything received)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family) as sock:
        sock.settimeout(5)
        sock.bind((source, 0))
        sock.connect(address)
        local: Address = sock.getsockname()[:2]
        received = b""
        if greeting:
            while not received.endswith(b"\n"):
                chunk = sock.recv(1024)
                assert chunk, "no greeting"
                received += chunk
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return local, received + recv_all(sock)


class Scene:
    """A Service at 127.212.N.1:8080 (or ::1) over one recording backend."""

    def __init__(self, tmp_path: Path, *, ipv6: bool = False, greeting: bytes = b"") -> None:
        net = next(_nets)
        self.name = f"pp{net}"
        self.client_ip = "::1" if ipv6 else f"127.212.{net}.77"
        self.recorder = Recorder(greeting)
        self.backend = Backend("::1" if ipv6 else f"127.212.{net}.10", self.recorder)
        if ipv6:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
                self.address: Address = ("::1", probe.getsockname()[1])
        else:
            self.address = (f"127.212.{net}.1", SERVICE_PORT)
        self.manifest = tmp_path / "manifests" / "pp.json"
        self.manifest.parent.mkdir()

    def publish(self, version: str | None, protocol: str = "TCP") -> None:
        annotations = {ANNOTATION: version} if version is not None else None
        ip, port = self.address
        svc_obj: dict[str, Any] = service(
            self.name, ip, port, annotations=annotations, protocol=protocol
        )
        eps_obj = endpoint_slice(f"{self.name}-1", self.name, self.backend.port, [self.backend.ip])
        if ":" in ip:
            svc_obj["spec"]["ipFamilies"] = ["IPv6"]
            eps_obj["addressType"] = "IPv6"
        eps_obj["ports"][0]["protocol"] = protocol
        write(self.manifest, svc_obj, eps_obj)


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    s = Scene(tmp_path)
    yield s
    s.backend.stop()


def expected_v1(client: Address, service_address: Address) -> bytes:
    family = "TCP6" if ":" in client[0] else "TCP4"
    (src, sport), (dst, dport) = client, service_address
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def check_header(version: str, record: bytes, client: Address, service_address: Address) -> bytes:
    """Assert ``record`` starts with the header naming ``client`` -> ``service_address``;
    return what followed it."""
    kind, source, destination, rest = parse(record)
    family = "TCP6" if ":" in client[0] else "TCP4"
    assert kind == (family if version == "v1" else f"v2-{family}")
    assert (source, destination) == (client, service_address)
    if version == "v1":
        assert record.startswith(expected_v1(client, service_address))
    return rest


both_loops = pytest.mark.both_loops


@both_loops
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_header_names_the_client_and_the_service_address(scene: Scene, version: str) -> None:
    scene.publish(version)
    async with running_proxy(scene.manifest.parent):
        client, answer = await asyncio.to_thread(talk, scene.address, scene.client_ip, b"hello\r\n")
    assert answer == b"ok"
    [(proxy_side, record)] = scene.recorder.seen
    # The backend's peer is the proxy; only the header knows the client.
    assert proxy_side[0] != scene.client_ip
    assert check_header(version, record, client, scene.address) == b"hello\r\n"


@both_loops
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_server_first_backend_still_gets_the_header_first(
    tmp_path: Path, version: str
) -> None:
    # SMTP-like: the backend speaks on accept, the client says nothing until it has read
    # the greeting; the header must not wait for a client byte, nor come after one.
    scene = Scene(tmp_path, greeting=b"220 ready\r\n")
    try:
        scene.publish(version)
        async with running_proxy(scene.manifest.parent):
            client, answer = await asyncio.to_thread(
                talk, scene.address, scene.client_ip, b"HELO x\r\n", greeting=True
            )
    finally:
        scene.backend.stop()
    assert answer == b"220 ready\r\nok"
    [(_, record)] = scene.recorder.seen
    assert check_header(version, record, client, scene.address) == b"HELO x\r\n"


@both_loops
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_ipv6(tmp_path: Path, version: str) -> None:
    scene = Scene(tmp_path, ipv6=True)
    try:
        scene.publish(version)
        async with running_proxy(scene.manifest.parent):
            client, answer = await asyncio.to_thread(talk, scene.address, "::1", b"six\n")
    finally:
        scene.backend.stop()
    assert answer == b"ok"
    [(_, record)] = scene.recorder.seen
    assert check_header(version, record, client, scene.address) == b"six\n"


@both_loops
async def test_annotation_changes_apply_to_new_connections(scene: Scene) -> None:
    scene.publish(None)
    async with running_proxy(scene.manifest.parent) as proxy:
        for step, version in enumerate((None, "v2", "v1", None)):
            if step:
                syncs = proxy.proxier.status.syncs
                scene.publish(version)
                await wait_for_sync(proxy, syncs)
            client, answer = await asyncio.to_thread(talk, scene.address, scene.client_ip, b"x")
            assert answer == b"ok"
            _, record = scene.recorder.seen[-1]
            if version is None:
                assert record == b"x"
            else:
                assert check_header(version, record, client, scene.address) == b"x"


@both_loops
async def test_bad_annotation_value_warns_once_and_sends_none(
    scene: Scene, caplog: pytest.LogCaptureFixture
) -> None:
    scene.publish("v9")
    with caplog.at_level(logging.WARNING, logger="userproxy.control.plan"):
        async with running_proxy(scene.manifest.parent):
            for _ in range(3):
                _, answer = await asyncio.to_thread(talk, scene.address, scene.client_ip, b"x")
                assert answer == b"ok"
    assert [record for _, record in scene.recorder.seen] == [b"x"] * 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "userproxy.control.plan"]
    assert len(warnings) == 1, warnings
    assert f"default/{scene.name}" in warnings[0]
    assert "'v9'" in warnings[0]


@both_loops
async def test_udp_service_gets_no_header(tmp_path: Path) -> None:
    net = next(_nets)
    backend = UdpBackend(f"127.212.{net}.10")  # echoes
    manifest = tmp_path / "m" / "udp.json"
    manifest.parent.mkdir()
    svc_obj = service("ppudp", f"127.212.{net}.1", 5353, annotations={ANNOTATION: "v2"})
    svc_obj["spec"]["ports"][0]["protocol"] = "UDP"
    eps_obj = endpoint_slice("ppudp-1", "ppudp", backend.port, [backend.ip])
    eps_obj["ports"][0]["protocol"] = "UDP"
    write(manifest, svc_obj, eps_obj)

    def ask_udp() -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.bind((f"127.212.{net}.77", 0))
            sock.sendto(b"datagram", (f"127.212.{net}.1", 5353))
            return sock.recv(2048)

    try:
        async with running_proxy(manifest.parent):
            assert await asyncio.to_thread(ask_udp) == b"datagram"
    finally:
        backend.stop()
