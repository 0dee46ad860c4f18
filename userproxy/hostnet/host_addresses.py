"""Reading the host's addresses over netlink, without blocking the event loop.

Everything here is read through pyroute2's ``AsyncIPRoute`` on the running loop, the
socket ``RECV_SIZE`` bytes at a time (the kernel fills a dump's next datagram only when the
last one is read).  Decoding is pure Python (~50 us an address), so one loop turn decodes
about 50 addresses, a few milliseconds, however many the host has.  The cyclic garbage
collector's passes remain (pyroute2's messages are cyclic garbage, ~36 objects an address):
a read of thousands of addresses can still pause the loop for tens of milliseconds, against
hundreds when it blocked (bench/node_addresses.py measures both).  ``read_host`` reads
once; what the proxy needs is decided from that read by pure functions.

uvloop cannot carry pyroute2's default transport (``create_datagram_endpoint`` on an
``AF_NETLINK`` socket: "ValueError: cannot open a UDP handle, invalid family 16"), so
``netlink()`` gives an ``AsyncIPRoute`` whose socket the loop watches with ``add_reader``,
which both loops support for any descriptor: one path for both.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from pyroute2 import AsyncIPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.core import CoreDatagramProtocol  # type: ignore[import-untyped]

__all__ = [
    "Address",
    "HostAddresses",
    "IPAddress",
    "dump_addresses",
    "netlink",
    "read_host",
    "select_nodeport_addresses",
    "sort_key",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Bytes read from the netlink socket per loop turn (the kernel's NLMSG_GOODSIZE): what
#: one turn decodes is bounded by this, not by the number of addresses.
RECV_SIZE = 4096

_IFF_LOOPBACK = 0x08  # linux/if.h
_RT_TABLE_MAIN = 254
_RTN_UNICAST = 1
_RT_SCOPE_LINK = 253
_FAMILIES = (socket.AF_INET, socket.AF_INET6)


class _ReaderTransport:
    """What pyroute2 needs of a datagram transport (``abort``, ``close``), over
    ``add_reader``: one datagram of at most RECV_SIZE bytes per call."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: Any) -> None:
        self._loop = loop
        self._sock: socket.socket | None = sock
        self._protocol = protocol
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._read)

    def _read(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:  # ENOBUFS and the like: pyroute2 fails the request
            self._protocol.error_received(exc)
            return
        self._protocol.datagram_received(data, None)

    def close(self) -> None:
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock = None

    abort = close


class _LoopIPRoute(AsyncIPRoute):  # type: ignore[misc]
    """``AsyncIPRoute`` on any loop: its socket read through ``_ReaderTransport``."""

    async def setup_endpoint(self) -> None:
        if getattr(self.local, "transport", None) is not None:
            return
        protocol = CoreDatagramProtocol(
            self.connection_lost, self.enqueue, self._error_event, self.status
        )
        self.local.transport = _ReaderTransport(self.event_loop, self.socket, protocol)
        self.local.protocol = protocol


@asynccontextmanager
async def netlink() -> AsyncIterator[Any]:
    """A NETLINK_ROUTE connection (pyroute2's ``AsyncIPRoute`` API) for this loop."""
    ipr = _LoopIPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def sort_key(address: IPAddress) -> tuple[int, int]:
    """IPv4 first, then numerically."""
    return address.version, int(address)


@dataclass(frozen=True, slots=True)
class Address:
    """One address as the kernel reports it."""

    index: int
    family: int
    address: IPAddress
    prefixlen: int
    scope: int
    proto: int

    @property
    def text(self) -> str:
        return self.address.compressed

    @property
    def link_local(self) -> bool:
        return self.address.version == 6 and (
            self.address.is_link_local or self.scope == _RT_SCOPE_LINK
        )


async def dump_addresses(ipr: Any) -> list[Address]:
    """Every address in this network namespace (``ip addr``)."""
    result: list[Address] = []
    async for msg in await ipr.addr("dump"):
        # IFA_LOCAL is the local end on point-to-point links, where IFA_ADDRESS is the peer.
        text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if not text:
            continue
        try:
            address = ipaddress.ip_address(str(text).partition("%")[0])
        except ValueError:
            continue
        result.append(
            Address(
                index=int(msg["index"]),
                family=int(msg["family"]),
                address=address,
                prefixlen=int(msg["prefixlen"]),
                scope=int(msg["scope"]),
                proto=int(msg.get_attr("IFA_PROTO") or 0),
            )
        )
    return result


async def _default_route_oifs(ipr: Any, family: int) -> frozenset[int]:
    """The interfaces holding a default route of ``family`` in the main table."""
    oifs: set[int] = set()
    async for msg in await ipr.route("dump", family=family):
        table = msg.get_attr("RTA_TABLE") or msg["table"]
        if msg["dst_len"] != 0 or msg["type"] != _RTN_UNICAST or table != _RT_TABLE_MAIN:
            continue
        oif = msg.get_attr("RTA_OIF")
        if oif:
            oifs.add(int(oif))
        for hop in msg.get_attr("RTA_MULTIPATH") or ():
            if hop.get("oif"):
                oifs.add(int(hop["oif"]))
    return frozenset(oifs)


@dataclass(frozen=True, slots=True)
class HostAddresses:
    """One read of the host: its addresses, its links, its default routes' interfaces."""

    addresses: tuple[Address, ...]
    #: ifindex -> (name, flags)
    links: Mapping[int, tuple[str, int]]
    #: family -> ifindexes with a default route (empty when routes were not read)
    default_oifs: Mapping[int, frozenset[int]]

    def _counted(self, exclude_devices: Iterable[str]) -> list[Address]:
        """The addresses that count: not IPv6 link-local (fe80::/10 or scope link), not on
        ``exclude_devices`` (e.g. an ``AddressManager``'s: service IPs are not NodePort
        addresses)."""
        names = set(exclude_devices)
        skip = {index for index, (name, _) in self.links.items() if name in names}
        return [a for a in self.addresses if not a.link_local and a.index not in skip]

    def local(self, exclude_devices: Iterable[str] = ()) -> frozenset[str]:
        """Every address that counts, loopback included, in canonical text."""
        return frozenset(a.text for a in self._counted(exclude_devices))

    def primary(self, exclude_devices: Iterable[str] = ()) -> frozenset[str]:
        """The node's primary IPs, which kube-proxy's ``nodePortAddresses: [primary]`` means.

        Upstream takes them from the Node object; userproxy reads the host instead.  Per
        family: the addresses that count on the interface(s) holding a default route in the
        main routing table (several with ECMP or several default routes); with no default
        route in a family, the first non-loopback address of that family in ifindex order."""
        addrs = sorted(self._counted(exclude_devices), key=lambda a: a.index)
        result: set[str] = set()
        for family in _FAMILIES:
            candidates = [a for a in addrs if a.family == family]
            oifs = self.default_oifs.get(family, frozenset())
            chosen = [a.text for a in candidates if a.index in oifs]
            if not chosen:
                chosen = [
                    a.text
                    for a in candidates
                    if not a.address.is_loopback
                    and not self.links.get(a.index, ("", 0))[1] & _IFF_LOOPBACK
                ][:1]
            result.update(chosen)
        return frozenset(result)


async def read_host(*, routes: bool = True) -> HostAddresses:
    """Read the host's links and addresses (and default routes, unless ``routes`` is
    False: only ``primary`` needs them) on one netlink connection."""
    async with netlink() as ipr:
        links = {
            int(msg["index"]): (str(msg.get_attr("IFLA_IFNAME")), int(msg["flags"]))
            async for msg in await ipr.link("dump")
        }
        addresses = tuple(await dump_addresses(ipr))
        oifs = {int(f): await _default_route_oifs(ipr, f) for f in _FAMILIES} if routes else {}
    return HostAddresses(addresses, links, oifs)


def select_nodeport_addresses(
    cidrs: Sequence[str], addresses: Iterable[str], primary: Iterable[str] = ()
) -> tuple[str, ...]:
    """The addresses NodePorts listen on, per ``--nodeport-addresses``.

    ``cidrs`` empty: all ``addresses``.  Otherwise the addresses inside any of the CIDRs, plus
    the ``primary`` ones if ``"primary"`` is listed.  Sorted (IPv4 first, then numerically),
    deduplicated, canonical text.  Pure: the caller reads the host."""
    parsed = {ipaddress.ip_address(a) for a in addresses}
    if not cidrs:
        return tuple(a.compressed for a in sorted(parsed, key=sort_key))
    networks = [ipaddress.ip_network(c, strict=False) for c in cidrs if c != "primary"]
    chosen = {a for a in parsed if any(a.version == n.version and a in n for n in networks)}
    if "primary" in cidrs:
        chosen.update(ipaddress.ip_address(a) for a in primary)
    return tuple(a.compressed for a in sorted(chosen, key=sort_key))
