"""PROXY protocol headers: how a backend learns the client a userspace proxy hides.

A relay dials the endpoint from the proxy's own address, so without help a backend sees
every client as the node.  HAProxy's PROXY protocol (``doc/proxy-protocol.txt`` in the
HAProxy sources; spoken by HAProxy ``send-proxy``/``send-proxy-v2``, Envoy's
``proxy_protocol`` transport socket, nginx ``proxy_protocol on``, AWS NLB) prefixes the
upstream connection with one header naming the original connection:

* v1, text: ``PROXY TCP4 <src ip> <dst ip> <src port> <dst port>\\r\\n`` (``TCP6`` for
  IPv6), at most 107 bytes;
* v2, binary: the 12-byte signature ``\\r\\n\\r\\n\\0\\r\\nQUIT\\n``, version and command
  ``0x21`` (version 2, PROXY), family and transport ``0x11`` (TCP over IPv4) or ``0x21``
  (TCP over IPv6), the address block's length (big-endian), then source address,
  destination address, source port, destination port in network byte order.

Source is the client's address and port as accepted; destination is the address and port
the client connected to (the accepted socket's ``getsockname()``: the Service IP, node IP
or load-balancer IP and the Service or node port), as HAProxy and Envoy fill them.

Invariants: every function here is pure (no I/O, no state) and total: an address that is
not a literal IP, or a connection whose two ends differ in family, gets the spec's
"unknown" header (v1 ``PROXY UNKNOWN\\r\\n``, v2 command LOCAL with family UNSPEC), which
tells the receiver to use the connection's own addresses; a header is never malformed.
IPv4-mapped IPv6 addresses (a dual-stack socket's view of an IPv4 client) are written as
IPv4, which is what the client really is.  TCP only: UDP sessions get no header (the v2
DGRAM form would need every datagram prefixed, and receivers rarely accept it).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from userproxy.model import ProxyProtocolVersion

__all__ = [
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "encode_v1",
    "encode_v2",
    "header_between",
    "header_for",
    "proxy_header",
]

#: The longest v1 header the specification allows (receivers read at most this much).
V1_MAX_LENGTH = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21  # version 2, command PROXY
_V2_LOCAL = 0x20  # version 2, command LOCAL: "use the connection's own addresses"
_V2_TCP4 = 0x11  # AF_INET, SOCK_STREAM
_V2_TCP6 = 0x21  # AF_INET6, SOCK_STREAM
_V2_IPV4 = struct.Struct("!12sBBH4s4sHH")
_V2_IPV6 = struct.Struct("!12sBBH16s16sHH")
_V2_UNSPEC = struct.pack("!12sBBH", V2_SIGNATURE, _V2_LOCAL, 0x00, 0)
_V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
_MAPPED_PREFIX = "::ffff:"

#: One endpoint of a connection: (literal IP, port).
Address = tuple[str, int]


def _family(ip: str) -> tuple[int, bytes] | None:
    """(address family, packed address) of a literal IP, None if it is not one."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        return family, socket.inet_pton(family, ip)
    except (OSError, ValueError):
        return None


def _plain(address: Address) -> Address:
    """``address`` with an IPv6 zone dropped and an IPv4-mapped IPv6 address unmapped."""
    ip, port = address
    if ":" in ip:  # only IPv6 text carries a zone or maps an IPv4 address
        ip = ip.partition("%")[0]
        if "." in ip and ip[:7].lower() == _MAPPED_PREFIX:
            ip = ip[7:]
    return ip, port


def _resolved(source: Address, destination: Address) -> tuple[int, bytes, bytes] | None:
    """(family, packed source, packed destination) when both ends are literal IPs of one
    family with valid ports; None means "unknown"."""
    src = _family(source[0])
    dst = _family(destination[0])
    if src is None or dst is None or src[0] != dst[0]:
        return None
    if not (0 <= source[1] <= 0xFFFF and 0 <= destination[1] <= 0xFFFF):
        return None
    return src[0], src[1], dst[1]


def encode_v1(source: Address, destination: Address) -> bytes:
    """The v1 (text) header for a TCP connection from ``source`` to ``destination``."""
    source, destination = _plain(source), _plain(destination)
    resolved = _resolved(source, destination)
    if resolved is None:
        return _V1_UNKNOWN
    family, src, dst = resolved
    if family == socket.AF_INET:
        # inet_pton accepts only the canonical dotted quad (no leading zeros, four parts),
        # so the text that passed it is written as it is.
        line = f"PROXY TCP4 {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
    else:
        # IPv6 has many spellings: written from the packed form, so the text is the
        # canonical one (lower case, longest zero run compressed).
        src_ip = socket.inet_ntop(family, src)
        dst_ip = socket.inet_ntop(family, dst)
        line = f"PROXY TCP6 {src_ip} {dst_ip} {source[1]} {destination[1]}\r\n"
    return line.encode("ascii")


def encode_v2(source: Address, destination: Address) -> bytes:
    """The v2 (binary) header for a TCP connection from ``source`` to ``destination``."""
    source, destination = _plain(source), _plain(destination)
    resolved = _resolved(source, destination)
    if resolved is None:
        return _V2_UNSPEC
    family, src, dst = resolved
    if family == socket.AF_INET:
        return _V2_IPV4.pack(
            V2_SIGNATURE, _V2_PROXY, _V2_TCP4, 12, src, dst, source[1], destination[1]
        )
    return _V2_IPV6.pack(V2_SIGNATURE, _V2_PROXY, _V2_TCP6, 36, src, dst, source[1], destination[1])


def proxy_header(version: ProxyProtocolVersion, source: Address, destination: Address) -> bytes:
    """The header of ``version`` for a TCP connection from ``source`` to ``destination``."""
    if version == "v2":
        return encode_v2(source, destination)
    return encode_v1(source, destination)


def _address(raw: Any) -> Address | None:
    """(ip, port) of a socket address as ``accept``/``getsockname`` return it (a 2-tuple
    for IPv4, a 4-tuple for IPv6), None for anything else."""
    if isinstance(raw, tuple) and len(raw) >= 2:
        ip, port = raw[0], raw[1]
        if isinstance(ip, str) and isinstance(port, int):
            return ip, port
    return None


def header_for(version: ProxyProtocolVersion, client: socket.socket, peer: Any) -> bytes:
    """The header for an accepted ``client`` socket whose peer address is ``peer`` (as
    ``accept()`` returned it): destination from ``client.getsockname()``.  A socket that
    cannot say its own address any more gets the "unknown" header (one system call; never
    raises)."""
    try:
        local = _address(client.getsockname())
    except OSError:
        local = None
    return header_between(version, _address(peer), local)


def header_between(
    version: ProxyProtocolVersion, source: Address | None, local: Address | None
) -> bytes:
    """The header for a connection from ``source`` to our ``local`` address; the "unknown"
    header when either is not known."""
    if local is None or source is None:
        return proxy_header(version, ("", 0), ("", 0))
    return proxy_header(version, source, local)
