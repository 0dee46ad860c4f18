"""Local addresses of the node, and the service IPs userproxy makes local itself.

Why this exists: kube-proxy's iptables/IPVS/nftables modes catch packets to a ClusterIP,
externalIP or load-balancer IP with netfilter (DNAT) before the routing decision, so those
IPs never need to exist on the node.  userproxy uses no netfilter: it accepts connections
on ordinary sockets bound to the service IP.  A packet routed to the node is only delivered
to a local socket when the kernel considers its destination address *local* (an entry in the
``local`` routing table); otherwise the node forwards it or drops it.  So every service IP
userproxy serves must be local to the node, one way or another (see docs/addressing.md).

The default is to do nothing to the host: listeners are bound with ``IP_FREEBIND`` so they
can be created before the address exists locally, and the operator makes the addresses local
(``ip route add local <service CIDR> dev lo``, or a dummy interface holding them).  With
``--manage-addresses`` an ``AddressManager`` does it: it adds each served IP as a /32 or
/128 to a device it owns (``userproxy0``), removes it when it stops being served, never
touches an address it did not add, and cleans up on exit.  What it owns is marked in the
kernel, so that ownership outlives the process (SIGKILL, crash): each address it adds
carries ``IFA_PROTO`` :data:`ADDRESS_PROTO`, and a device it creates carries the alias
:data:`DEVICE_ALIAS`.  ``cleanup()`` (``userproxy cleanup``) removes exactly what carries
those marks, from another process, after a crash.

Netlink access uses pyroute2's synchronous ``IPRoute``.  Since pyroute2 0.9 that class runs
its own asyncio event loop with ``run_until_complete`` and therefore raises "This event loop
is already running" when used in a thread whose event loop is running; every call here is
done on a short-lived worker thread in that case (``_outside_event_loop``), so the
functions work the same from plain code and from the asyncio sync path.  The calls take
well under a millisecond and run on sync, not per connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

__all__ = [
    "ADDRESS_PROTO",
    "DEVICE_ALIAS",
    "AddressManager",
    "Cleanup",
    "cleanup",
    "local_addresses",
    "primary_addresses",
    "select_nodeport_addresses",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: IFA_PROTO value stamped on every address an ``AddressManager`` adds (iproute2 shows it as
#: ``proto 0x75``).  Addresses carrying it on the manager's device are leftovers of an earlier
#: userproxy run that could not clean up (SIGKILL, crash); ``open()`` adopts them as its own so
#: the next ``sync`` removes the ones no longer served.
ADDRESS_PROTO = 0x75

#: Alias (``IFLA_IFALIAS``, ``ip link`` shows it) given to a device an ``AddressManager``
#: creates: after a crash, the device can still be told apart from one made by hand.  A
#: later ``open()`` adopts a device carrying it (and deletes it on close); ``cleanup()``
#: deletes it.  A device without it is never deleted.
DEVICE_ALIAS = "userproxy: created by --manage-addresses"

_IFA_F_NODAD = 0x02  # linux/if_addr.h: no duplicate address detection, usable at once
_IFF_LOOPBACK = 0x08  # linux/if.h
_RT_TABLE_MAIN = 254
_RTN_UNICAST = 1
_RT_SCOPE_LINK = 253
_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_GONE = (errno.EADDRNOTAVAIL, errno.ESRCH, errno.ENOENT, errno.ENODEV)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _outside_event_loop(fn: Callable[[], T]) -> T:
    """Run ``fn`` here, or on a worker thread if this thread runs an asyncio event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="userproxy-netlink") as pool:
        return pool.submit(fn).result()


def _sort_key(address: IPAddress) -> tuple[int, int]:
    return address.version, int(address)


@dataclass(frozen=True, slots=True)
class _Addr:
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


def _dump_addresses(ipr: Any) -> list[_Addr]:
    result: list[_Addr] = []
    for msg in ipr.addr("dump"):
        # IFA_LOCAL is the local end on point-to-point links, where IFA_ADDRESS is the peer.
        text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if not text:
            continue
        try:
            address = ipaddress.ip_address(str(text).partition("%")[0])
        except ValueError:
            continue
        result.append(
            _Addr(
                index=int(msg["index"]),
                family=int(msg["family"]),
                address=address,
                prefixlen=int(msg["prefixlen"]),
                scope=int(msg["scope"]),
                proto=int(msg.get_attr("IFA_PROTO") or 0),
            )
        )
    return result


def _links(ipr: Any) -> dict[int, tuple[str, int]]:
    """ifindex -> (name, flags)."""
    return {
        int(msg["index"]): (str(msg.get_attr("IFLA_IFNAME")), int(msg["flags"]))
        for msg in ipr.link("dump")
    }


def _excluded_indexes(links: dict[int, tuple[str, int]], devices: Iterable[str]) -> set[int]:
    names = set(devices)
    return {index for index, (name, _) in links.items() if name in names}


def local_addresses(*, exclude_devices: Iterable[str] = ()) -> frozenset[str]:
    """Every address on every interface of this network namespace, loopback included, in
    canonical text; IPv6 link-local (fe80::/10 or scope link) left out.

    ``exclude_devices``: interface names whose addresses do not count, e.g. the device of an
    ``AddressManager`` (its service IPs must not become NodePort addresses)."""

    def read() -> frozenset[str]:
        with IPRoute() as ipr:
            skip = _excluded_indexes(_links(ipr), exclude_devices)
            return frozenset(
                a.text for a in _dump_addresses(ipr) if not a.link_local and a.index not in skip
            )

    return _outside_event_loop(read)


def _default_route_oifs(ipr: Any, family: int) -> set[int]:
    oifs: set[int] = set()
    for msg in ipr.route("dump", family=family):
        table = msg.get_attr("RTA_TABLE") or msg["table"]
        if msg["dst_len"] != 0 or msg["type"] != _RTN_UNICAST or table != _RT_TABLE_MAIN:
            continue
        oif = msg.get_attr("RTA_OIF")
        if oif:
            oifs.add(int(oif))
        for hop in msg.get_attr("RTA_MULTIPATH") or ():
            if hop.get("oif"):
                oifs.add(int(hop["oif"]))
    return oifs


def primary_addresses(*, exclude_devices: Iterable[str] = ()) -> frozenset[str]:
    """The node's primary IPs, which kube-proxy's ``nodePortAddresses: [primary]`` means.

    Upstream takes them from the Node object; userproxy reads the host instead.  Per family
    (IPv4, IPv6): the addresses of the interface(s) that hold a default route in the main
    routing table (several with ECMP or several default routes); with no default route in a
    family, the first non-loopback address of that family in ifindex order.  IPv6 link-local
    addresses never count, nor addresses on ``exclude_devices``."""

    def read() -> frozenset[str]:
        with IPRoute() as ipr:
            links = _links(ipr)
            skip = _excluded_indexes(links, exclude_devices)
            addrs = sorted(
                (a for a in _dump_addresses(ipr) if not a.link_local and a.index not in skip),
                key=lambda a: a.index,
            )
            result: set[str] = set()
            for family in _FAMILIES:
                candidates = [a for a in addrs if a.family == family]
                oifs = _default_route_oifs(ipr, family)
                chosen = [a.text for a in candidates if a.index in oifs]
                if not chosen:
                    chosen = [
                        a.text
                        for a in candidates
                        if not a.address.is_loopback
                        and not links.get(a.index, ("", 0))[1] & _IFF_LOOPBACK
                    ][:1]
                result.update(chosen)
            return frozenset(result)

    return _outside_event_loop(read)


def select_nodeport_addresses(
    cidrs: Sequence[str], addresses: Iterable[str], primary: Iterable[str] = ()
) -> tuple[str, ...]:
    """The addresses NodePorts listen on, per ``--nodeport-addresses``.

    ``cidrs`` empty: all ``addresses``.  Otherwise the addresses inside any of the CIDRs, plus
    the ``primary`` ones if ``"primary"`` is listed.  Sorted (IPv4 first, then numerically),
    deduplicated, canonical text.  Pure: the caller reads the host."""
    parsed = {ipaddress.ip_address(a) for a in addresses}
    if not cidrs:
        return tuple(a.compressed for a in sorted(parsed, key=_sort_key))
    networks = [ipaddress.ip_network(c, strict=False) for c in cidrs if c != "primary"]
    chosen = {a for a in parsed if any(a.version == n.version and a in n for n in networks)}
    if "primary" in cidrs:
        chosen.update(ipaddress.ip_address(a) for a in primary)
    return tuple(a.compressed for a in sorted(chosen, key=_sort_key))


class AddressManager:
    """Keeps the service IPs userproxy serves on a device it owns (``--manage-addresses``).

    ``open()`` finds or creates the device (kind ``dummy``; where the kernel lacks the dummy
    driver, an empty ``bridge``, which holds addresses the same way) and brings it up.
    ``sync(wanted)`` adds each missing wanted address as a /32 or /128 (IPv6 with
    ``IFA_F_NODAD``, usable at once) and removes the ones it added that are no longer wanted.
    An address already present on any interface is left alone and never becomes "ours";
    addresses it did not add are never removed.  ``close()`` removes what it added and deletes
    the device if it created it.  Needs CAP_NET_ADMIN; not thread-safe (one caller, the sync
    path).  Errors per address are logged and do not stop the others."""

    def __init__(self, device: str = "userproxy0") -> None:
        self._device = device
        self._added: set[str] = set()
        self._created = False
        self._kind: str | None = None
        self._open = False

    @property
    def device(self) -> str:
        return self._device

    @property
    def added(self) -> frozenset[str]:
        """The addresses this manager added and still owns."""
        return frozenset(self._added)

    @property
    def created(self) -> bool:
        """Whether this manager created the device (and so deletes it on close)."""
        return self._created

    @property
    def kind(self) -> str | None:
        """The device's link kind (``dummy``, ``bridge``, ...) once open."""
        return self._kind

    def __enter__(self) -> AddressManager:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- public operations -------------------------------------------------------------

    def open(self) -> None:
        """Find or create the device and bring it up.  Raises OSError if it cannot."""

        def run() -> None:
            with IPRoute() as ipr:
                index = self._ensure_device(ipr)
                self._adopt_leftovers(ipr, index)

        _outside_event_loop(run)
        self._open = True

    def sync(self, wanted: Iterable[str]) -> None:
        """Make the device hold exactly ``wanted`` among the addresses this manager adds."""
        targets: set[IPAddress] = set()
        for text in wanted:
            try:
                targets.add(ipaddress.ip_address(text))
            except ValueError:
                log.error("manage-addresses: %r is not an IP address; not added", text)

        def run() -> None:
            with IPRoute() as ipr:
                index = self._ensure_device(ipr)
                self._apply(ipr, index, targets)

        _outside_event_loop(run)
        self._open = True

    def close(self) -> None:
        """Remove every address this manager added; delete the device if it created it.
        Idempotent; errors are logged, never raised."""
        if not (self._open or self._added or self._created):
            return

        def run() -> None:
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=self._device)
                index = int(found[0]) if found else None
                if index is not None:
                    for text in sorted(self._added):
                        self._remove(ipr, index, ipaddress.ip_address(text))
                    if self._created:
                        try:
                            ipr.link("del", index=index)
                            log.info("manage-addresses: deleted device %s", self._device)
                        except NetlinkError as exc:
                            if exc.code not in _GONE:
                                log.error(
                                    "manage-addresses: cannot delete device %s: errno %d (%s)",
                                    self._device,
                                    exc.code,
                                    os.strerror(exc.code),
                                )
                self._added.clear()

        try:
            _outside_event_loop(run)
        except OSError as exc:
            log.error("manage-addresses: cleanup of %s failed: %s", self._device, exc)
        self._open = False
        self._created = False

    # -- internals ---------------------------------------------------------------------

    def _ensure_device(self, ipr: Any) -> int:
        found = ipr.link_lookup(ifname=self._device)
        if found and self._kind is not None:
            return int(found[0])
        if not found:
            if self._open:
                # Someone deleted it while we ran: its addresses went with it.
                log.warning("manage-addresses: device %s vanished; recreating", self._device)
                self._added.clear()
            self._create_device(ipr)
            found = ipr.link_lookup(ifname=self._device)
            if not found:
                raise OSError(errno.ENODEV, f"device {self._device} missing after creation")
        index = int(found[0])
        link = ipr.link("get", index=index)[0]
        info = link.get_attr("IFLA_LINKINFO")
        self._kind = str(info.get_attr("IFLA_INFO_KIND")) if info is not None else "unknown"
        if not self._created and link.get_attr("IFLA_IFALIAS") == DEVICE_ALIAS:
            # Created by an earlier run that could not clean up: ours to delete on close.
            self._created = True
            log.info(
                "manage-addresses: adopting device %s (kind %s) left by an earlier run",
                self._device,
                self._kind,
            )
        elif not self._created:
            log.info(
                "manage-addresses: using existing device %s (kind %s)", self._device, self._kind
            )
        ipr.link("set", index=index, state="up")
        return index

    def _create_device(self, ipr: Any) -> None:
        failures: list[str] = []
        for kind in ("dummy", "bridge"):
            try:
                ipr.link("add", ifname=self._device, kind=kind)
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:  # created meanwhile by someone else
                    return
                failures.append(f"{kind}: errno {exc.code} ({os.strerror(exc.code)})")
                log.debug("manage-addresses: cannot create %s as %s: %s", self._device, kind, exc)
                continue
            self._created = True
            log.info("manage-addresses: created device %s (kind %s)", self._device, kind)
            self._mark_device(ipr)
            return
        raise OSError(
            errno.EOPNOTSUPP, f"cannot create device {self._device}: {'; '.join(failures)}"
        )

    def _mark_device(self, ipr: Any) -> None:
        """Give the device just created the alias that says it is ours (DEVICE_ALIAS)."""
        found = ipr.link_lookup(ifname=self._device)
        if not found:
            return  # deleted meanwhile; _ensure_device notices
        try:
            ipr.link("set", index=int(found[0]), ifalias=DEVICE_ALIAS)
        except NetlinkError as exc:
            # Not fatal: only a cleanup after a crash needs the mark (it then keeps the device).
            log.warning(
                "manage-addresses: cannot mark device %s as ours: errno %d (%s); after a "
                "crash, `userproxy cleanup` will leave the device (not its addresses)",
                self._device,
                exc.code,
                os.strerror(exc.code),
            )

    def _adopt_leftovers(self, ipr: Any, index: int) -> None:
        for a in _dump_addresses(ipr):
            if a.index == index and a.proto == ADDRESS_PROTO and a.text not in self._added:
                log.info(
                    "manage-addresses: adopting %s on %s left by an earlier run",
                    a.text,
                    self._device,
                )
                self._added.add(a.text)

    def _apply(self, ipr: Any, index: int, targets: set[IPAddress]) -> None:
        present = _dump_addresses(ipr)
        on_device = {a.text for a in present if a.index == index}
        anywhere = {a.text for a in present}
        # Forget addresses that someone else removed: they are re-added below if wanted.
        self._added &= on_device
        for address in sorted(targets, key=_sort_key):
            text = address.compressed
            if text in self._added:
                continue
            if text in anywhere:
                log.debug("manage-addresses: %s is already local; not ours to manage", text)
                continue
            self._add(ipr, index, address)
        for text in sorted(self._added - {t.compressed for t in targets}):
            self._remove(ipr, index, ipaddress.ip_address(text))

    def _add(self, ipr: Any, index: int, address: IPAddress) -> None:
        v6 = address.version == 6
        try:
            ipr.addr(
                "add",
                index=index,
                address=address.compressed,
                prefixlen=128 if v6 else 32,
                flags=_IFA_F_NODAD if v6 else 0,
                proto=ADDRESS_PROTO,
            )
        except NetlinkError as exc:
            log.error(
                "manage-addresses: cannot add %s to %s: errno %d (%s)",
                address,
                self._device,
                exc.code,
                os.strerror(exc.code),
            )
            return
        self._added.add(address.compressed)
        log.info("manage-addresses: added %s to %s", address, self._device)

    def _remove(self, ipr: Any, index: int, address: IPAddress) -> None:
        try:
            ipr.addr(
                "del",
                index=index,
                address=address.compressed,
                prefixlen=128 if address.version == 6 else 32,
            )
        except NetlinkError as exc:
            if exc.code not in _GONE:
                log.error(
                    "manage-addresses: cannot remove %s from %s: errno %d (%s)",
                    address,
                    self._device,
                    exc.code,
                    os.strerror(exc.code),
                )
                return
        self._added.discard(address.compressed)
        log.info("manage-addresses: removed %s from %s", address, self._device)


@dataclass(frozen=True, slots=True)
class Cleanup:
    """What ``cleanup()`` found and did on one device.

    ``removed``: the addresses carrying ADDRESS_PROTO that were removed.  ``others``: the
    addresses on the device that userproxy did not add (IPv6 link-local left out), kept.
    ``deleted``: whether the device was deleted (only when it carries DEVICE_ALIAS and
    holds no ``others``)."""

    device: str
    found: bool
    removed: tuple[str, ...] = ()
    others: tuple[str, ...] = ()
    marked: bool = False
    deleted: bool = False

    def summary(self) -> str:
        """One line for the operator: what was removed, and why anything stayed."""
        if not self.found:
            return f"nothing to clean up: no device {self.device}"
        parts = []
        if self.removed:
            parts.append(
                f"removed {len(self.removed)} addresses from {self.device} "
                f"({', '.join(self.removed)})"
            )
        else:
            parts.append(f"no addresses of userproxy's on {self.device}")
        if self.deleted:
            parts.append(f"deleted device {self.device}")
        elif not self.marked:
            parts.append(f"kept device {self.device}: not created by userproxy")
        else:
            parts.append(
                f"kept device {self.device}: it holds addresses userproxy did not add "
                f"({', '.join(self.others)})"
            )
        return "; ".join(parts)


def cleanup(device: str = "userproxy0") -> Cleanup:
    """Remove what ``AddressManager``s left on ``device`` (kube-proxy's ``--cleanup``).

    Meant for after a crash or SIGKILL, when no userproxy runs with this device: every
    address on ``device`` marked with ADDRESS_PROTO is removed, and the device is deleted if
    it carries DEVICE_ALIAS and no address that userproxy did not add remains.  Nothing
    without the marks is touched.  Idempotent: a second call finds nothing.  Raises
    OSError (with the errno, e.g. EPERM without CAP_NET_ADMIN) when netlink refuses."""

    def run() -> Cleanup:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=device)
            if not found:
                return Cleanup(device, found=False)
            index = int(found[0])
            marked = ipr.link("get", index=index)[0].get_attr("IFLA_IFALIAS") == DEVICE_ALIAS
            removed: list[str] = []
            others: list[str] = []
            for a in _dump_addresses(ipr):
                if a.index != index:
                    continue
                if a.proto != ADDRESS_PROTO:
                    if not a.link_local:
                        others.append(a.text)
                    continue
                try:
                    ipr.addr("del", index=index, address=a.text, prefixlen=a.prefixlen)
                except NetlinkError as exc:
                    if exc.code not in _GONE:
                        raise OSError(
                            exc.code,
                            f"cannot remove {a.text} from {device}: {os.strerror(exc.code)}",
                        ) from exc
                removed.append(a.text)
            deleted = False
            if marked and not others:
                try:
                    ipr.link("del", index=index)
                except NetlinkError as exc:
                    if exc.code not in _GONE:
                        raise OSError(
                            exc.code, f"cannot delete device {device}: {os.strerror(exc.code)}"
                        ) from exc
                deleted = True
            return Cleanup(device, True, tuple(removed), tuple(others), marked, deleted)

    try:
        return _outside_event_loop(run)
    except NetlinkError as exc:  # from the lookups: report it as the OSError it is
        raise OSError(exc.code, f"{device}: {os.strerror(exc.code)}") from exc
