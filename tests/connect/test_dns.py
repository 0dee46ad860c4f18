"""``userproxy connect``'s DNS responder, asked by a real resolver library (dnspython)
over UDP and TCP: the Services' names answer with their local addresses, anything else
is refused, and garbage never ends it.

Addresses: the responder on 127.0.133.53 (no other test uses it).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from userproxy.connect.dns import TTL, DnsTcp, DnsUdp
from userproxy.connect.hosts_file import names_for

HOST = "127.0.133.53"
NAMES = dict.fromkeys(names_for("default", "web"), "127.77.1.2")
NAMES["db.data"] = "::1"


@pytest.fixture
async def responder() -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    tcp = await loop.create_server(lambda: DnsTcp(NAMES), HOST, 0)
    port = tcp.sockets[0].getsockname()[1]
    udp, _ = await loop.create_datagram_endpoint(lambda: DnsUdp(NAMES), local_addr=(HOST, port))
    try:
        yield port
    finally:
        udp.close()
        tcp.close()
        await tcp.wait_closed()


def ask(name: str, rdtype: str, port: int, *, tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(query, HOST, port=port, timeout=3)


@pytest.mark.both_loops
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_every_name_of_a_service_answers_and_the_rest_is_refused(
    responder: int, tcp: bool
) -> None:
    for name in (*names_for("default", "web"), "WEB.Default.svc.cluster.local."):
        reply = await asyncio.to_thread(ask, name, "A", responder, tcp=tcp)
        assert reply.rcode() == dns.rcode.NOERROR
        assert reply.flags & dns.flags.AA
        (rrset,) = reply.answer
        assert [r.address for r in rrset] == ["127.77.1.2"]
        assert rrset.ttl == TTL
    nodata = await asyncio.to_thread(ask, "web.default", "AAAA", responder, tcp=tcp)
    assert (nodata.rcode(), nodata.answer) == (dns.rcode.NOERROR, [])
    six = await asyncio.to_thread(ask, "db.data", "AAAA", responder, tcp=tcp)
    assert [r.address for r in six.answer[0]] == ["::1"]
    refused = await asyncio.to_thread(ask, "example.com", "A", responder, tcp=tcp)
    assert refused.rcode() == dns.rcode.REFUSED


@pytest.mark.both_loops
async def test_garbage_gets_formerr_or_nothing_and_the_responder_goes_on(responder: int) -> None:
    def send_raw(data: bytes) -> bytes | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.5)
            sock.sendto(data, (HOST, responder))
            try:
                return sock.recv(512)
            except TimeoutError:
                return None

    assert await asyncio.to_thread(send_raw, b"\x01") is None  # not even a header
    # A header and a name that runs past the end: FORMERR (rcode 1) for its id.
    reply = await asyncio.to_thread(
        send_raw, b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05web"
    )
    assert reply is not None
    assert reply[:2] == b"\x12\x34"
    assert reply[3] & 0x0F == 1
    answer = await asyncio.to_thread(ask, "web", "A", responder)
    assert answer.rcode() == dns.rcode.NOERROR
