"""A small authoritative DNS responder for ``userproxy connect --dns ADDR:PORT``: the
Services' names (``svc``, ``svc.ns``, ``svc.ns.svc``, ``svc.ns.svc.<cluster domain>``)
answer with their local addresses; every other name is refused (REFUSED), so a resolver
set up to ask it for the cluster's names only (systemd-resolved's per-link domains,
macOS's /etc/resolver/<domain>) never sees a wrong answer for anything else.

The wire format (RFC 1035) handled here is the part a stub resolver sends: one question,
names without compression; over UDP and over TCP (two-byte length prefix).  A query that
cannot be parsed gets FORMERR when its header can be read, and is dropped otherwise;
nothing a client sends can end the responder.

Invariants: an answer is at most 512 bytes over UDP (one A or AAAA record per name always
fits: names are at most 255 bytes); a known name asked for a type it has no record of gets
NOERROR with no answer (NODATA), as an authoritative server answers; answers carry the AA
flag and a short TTL (``TTL``), since a Service's address can change with the next run.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from collections.abc import Mapping
from typing import cast

log = logging.getLogger(__name__)

__all__ = ["TTL", "DnsTcp", "DnsUdp", "answer"]

TTL = 5
_A, _AAAA, _ANY = 1, 28, 255
_IN = 1
_NOERROR, _FORMERR, _REFUSED = 0, 1, 5
_HEADER = struct.Struct("!HHHHHH")


class _Malformed(Exception):
    pass


def _question(query: bytes) -> tuple[str, int, int, int]:
    """(name, type, class, end offset) of the first question."""
    labels = []
    offset = _HEADER.size
    while True:
        if offset >= len(query):
            raise _Malformed("truncated name")
        length = query[offset]
        offset += 1
        if length == 0:
            break
        if length & 0xC0:
            raise _Malformed("compressed name in a question")
        label = query[offset : offset + length]
        if len(label) != length:
            raise _Malformed("truncated label")
        labels.append(label.decode("ascii", errors="replace").lower())
        offset += length
    if offset + 4 > len(query):
        raise _Malformed("truncated question")
    qtype, qclass = struct.unpack_from("!HH", query, offset)
    return ".".join(labels), qtype, qclass, offset + 4


def answer(query: bytes, names: Mapping[str, str]) -> bytes | None:
    """The response to ``query``: ``names`` maps lowercase names (no final dot) to an
    address.  None: not even a header to answer to."""
    if len(query) < _HEADER.size:
        return None
    ident, flags, qdcount, _an, _ns, _ar = _HEADER.unpack_from(query)
    if flags & 0x8000:
        return None  # a response: never answer one (no loops between two responders)
    rd = flags & 0x0100
    opcode = (flags >> 11) & 0xF
    try:
        if qdcount != 1 or opcode != 0:
            raise _Malformed("not one standard query")
        name, qtype, qclass, end = _question(query)
    except _Malformed:
        return _HEADER.pack(ident, 0x8000 | rd | _FORMERR, 0, 0, 0, 0)
    question = query[_HEADER.size : end]
    address = names.get(name)
    if address is None or qclass != _IN:
        return _HEADER.pack(ident, 0x8000 | rd | _REFUSED, 1, 0, 0, 0) + question
    ip = ipaddress.ip_address(address)
    record_type = _A if ip.version == 4 else _AAAA
    header_flags = 0x8000 | 0x0400 | rd | _NOERROR  # QR, AA
    if qtype not in (record_type, _ANY):
        return _HEADER.pack(ident, header_flags, 1, 0, 0, 0) + question  # NODATA
    record = b"\xc0\x0c" + struct.pack("!HHIH", record_type, _IN, TTL, len(ip.packed))
    return _HEADER.pack(ident, header_flags, 1, 1, 0, 0) + question + record + ip.packed


class DnsUdp(asyncio.DatagramProtocol):
    """The UDP side: one answer per query datagram."""

    def __init__(self, names: Mapping[str, str]) -> None:
        self.names = names
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.DatagramTransport", transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        response = answer(data, self.names)
        if response is not None and self._transport is not None:
            self._transport.sendto(response, addr)


class DnsTcp(asyncio.Protocol):
    """The TCP side: queries with a two-byte length prefix, answered in order."""

    def __init__(self, names: Mapping[str, str]) -> None:
        self.names = names
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 2:
            (length,) = struct.unpack_from("!H", self._buffer)
            if len(self._buffer) < 2 + length:
                return  # the rest of this query is still to come
            query = bytes(self._buffer[2 : 2 + length])
            del self._buffer[: 2 + length]
            response = answer(query, self.names)
            if response is None:
                if self._transport is not None:
                    self._transport.close()  # not DNS: end the connection
                return
            if self._transport is not None:
                self._transport.write(struct.pack("!H", len(response)) + response)
