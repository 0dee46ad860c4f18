"""The service IPs userproxy makes local itself, on a device it owns (``--manage-addresses``).

Without netfilter (no DNAT), the kernel delivers a packet to a listener bound to a service
IP only if that address is *local* to the node; docs/addressing.md explains this and the
ways to do it.  By default userproxy leaves that to the operator (listeners bind with
``IP_FREEBIND``); with ``--manage-addresses`` an ``AddressManager`` keeps the addresses on
a device it owns, as kube-proxy's IPVS mode does with its ``kube-ipvs0`` device.

What it owns is marked in the kernel, so that ownership outlives the process (SIGKILL,
crash): each address it adds carries ``IFA_PROTO`` :data:`ADDRESS_PROTO`, and a device it
creates carries the alias :data:`DEVICE_ALIAS`.  ``cleanup()`` (``userproxy cleanup``)
removes exactly what carries those marks, from another process, after a crash.

Every netlink call is awaited on the running loop (``host_addresses.netlink``), so a sync
that adds thousands of addresses never holds the data plane up.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from userproxy.hostnet.host_addresses import IPAddress, dump_addresses, netlink, sort_key

__all__ = ["ADDRESS_PROTO", "DEVICE_ALIAS", "AddressManager", "Cleanup", "cleanup"]

log = logging.getLogger(__name__)

#: IFA_PROTO stamped on every address an ``AddressManager`` adds (``ip addr``: ``proto
#: 0x75``).  ``open()`` adopts those an earlier run left on its device (SIGKILL, crash), so
#: the next ``sync`` removes the ones no longer served.
ADDRESS_PROTO = 0x75

#: Alias (``IFLA_IFALIAS``) of a device an ``AddressManager`` creates, telling it apart from
#: one made by hand: a later ``open()`` adopts it (and deletes it on close); ``cleanup()``
#: deletes it.  A device without it is never deleted.
DEVICE_ALIAS = "userproxy: created by --manage-addresses"

_IFA_F_NODAD = 0x02  # linux/if_addr.h: no duplicate address detection, usable at once
#: Errors meaning "already gone": removing it again is done, not failed.
_GONE = (errno.EADDRNOTAVAIL, errno.ESRCH, errno.ENOENT, errno.ENODEV)


def _refused(exc: NetlinkError) -> str:
    return f"errno {exc.code} ({os.strerror(exc.code)})"


async def _lookup(ipr: Any, device: str) -> int | None:
    found = await ipr.link_lookup(ifname=device)
    return int(found[0]) if found else None


class AddressManager:
    """Keeps the service IPs userproxy serves on a device it owns (``--manage-addresses``).

    The device is a ``dummy`` (where the kernel lacks that driver, an empty ``bridge``, which
    holds addresses the same way); each address a /32 or /128 (IPv6 with ``IFA_F_NODAD``,
    usable at once).  An address already present on any interface is left alone and never
    becomes "ours"; addresses it did not add are never removed.  Needs CAP_NET_ADMIN; one
    caller at a time (the sync path).  Errors per address are logged and do not stop the
    others."""

    def __init__(self, device: str = "userproxy0") -> None:
        self._device = device
        self._added: set[str] = set()
        self._created = False
        self._kind: str | None = None
        self._open = False

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

    # -- public operations -------------------------------------------------------------

    async def open(self) -> None:
        """Find or create the device and bring it up.  Raises OSError if it cannot."""
        async with netlink() as ipr:
            index = await self._ensure_device(ipr)
            await self._adopt_leftovers(ipr, index)
        self._open = True

    async def sync(self, wanted: Iterable[str]) -> None:
        """Make the device hold exactly ``wanted`` among the addresses this manager adds."""
        targets: set[IPAddress] = set()
        for text in wanted:
            try:
                targets.add(ipaddress.ip_address(text))
            except ValueError:
                log.error("manage-addresses: %r is not an IP address; not added", text)
        async with netlink() as ipr:
            index = await self._ensure_device(ipr)
            await self._apply(ipr, index, targets)
        self._open = True

    async def close(self) -> None:
        """Remove every address this manager added; delete the device if it created it.
        Idempotent; errors are logged, never raised."""
        if not (self._open or self._added or self._created):
            return
        try:
            async with netlink() as ipr:
                index = await _lookup(ipr, self._device)
                if index is not None:
                    for text in sorted(self._added):
                        await self._remove(ipr, index, ipaddress.ip_address(text))
                    if self._created:
                        await self._delete_device(ipr, index)
                self._added.clear()
        except OSError as exc:
            log.error("manage-addresses: cleanup of %s failed: %s", self._device, exc)
        self._open = False
        self._created = False

    # -- internals ---------------------------------------------------------------------

    async def _ensure_device(self, ipr: Any) -> int:
        index = await _lookup(ipr, self._device)
        if index is not None and self._kind is not None:
            return index
        if index is None:
            if self._open:
                # Someone deleted it while we ran: its addresses went with it.
                log.warning("manage-addresses: device %s vanished; recreating", self._device)
                self._added.clear()
            await self._create_device(ipr)
            index = await _lookup(ipr, self._device)
            if index is None:
                raise OSError(errno.ENODEV, f"device {self._device} missing after creation")
        link = (await ipr.link("get", index=index))[0]
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
        await ipr.link("set", index=index, state="up")
        return index

    async def _create_device(self, ipr: Any) -> None:
        failures: list[str] = []
        for kind in ("dummy", "bridge"):
            try:
                await ipr.link("add", ifname=self._device, kind=kind)
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:  # created meanwhile by someone else
                    return
                failures.append(f"{kind}: {_refused(exc)}")
                log.debug("manage-addresses: cannot create %s as %s: %s", self._device, kind, exc)
                continue
            self._created = True
            log.info("manage-addresses: created device %s (kind %s)", self._device, kind)
            await self._mark_device(ipr)
            return
        raise OSError(
            errno.EOPNOTSUPP, f"cannot create device {self._device}: {'; '.join(failures)}"
        )

    async def _mark_device(self, ipr: Any) -> None:
        index = await _lookup(ipr, self._device)
        if index is None:
            return  # deleted meanwhile; _ensure_device notices
        try:
            await ipr.link("set", index=index, ifalias=DEVICE_ALIAS)
        except NetlinkError as exc:
            # Not fatal: only a cleanup after a crash needs the mark (it then keeps the device).
            log.warning(
                "manage-addresses: cannot mark device %s as ours: %s; after a crash, "
                "`userproxy cleanup` will leave the device (not its addresses)",
                self._device,
                _refused(exc),
            )

    async def _delete_device(self, ipr: Any, index: int) -> None:
        try:
            await ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code not in _GONE:
                log.error(
                    "manage-addresses: cannot delete device %s: %s", self._device, _refused(exc)
                )
        else:
            log.info("manage-addresses: deleted device %s", self._device)

    async def _adopt_leftovers(self, ipr: Any, index: int) -> None:
        for a in await dump_addresses(ipr):
            if a.index == index and a.proto == ADDRESS_PROTO and a.text not in self._added:
                log.info(
                    "manage-addresses: adopting %s on %s (added by an earlier or handing-off run)",
                    a.text,
                    self._device,
                )
                self._added.add(a.text)

    async def _apply(self, ipr: Any, index: int, targets: set[IPAddress]) -> None:
        present = await dump_addresses(ipr)
        on_device = {a.text for a in present if a.index == index}
        anywhere = {a.text for a in present}
        # Forget addresses that someone else removed: they are re-added below if wanted.
        self._added &= on_device
        for address in sorted(targets, key=sort_key):
            text = address.compressed
            if text in self._added:
                continue
            if text in anywhere:
                log.debug("manage-addresses: %s is already local; not ours to manage", text)
                continue
            await self._add(ipr, index, address)
        for text in sorted(self._added - {t.compressed for t in targets}):
            await self._remove(ipr, index, ipaddress.ip_address(text))

    async def _add(self, ipr: Any, index: int, address: IPAddress) -> None:
        v6 = address.version == 6
        # Ours before the kernel answers: a sync cancelled meanwhile (at shutdown) still
        # leaves it to close() to remove.
        self._added.add(address.compressed)
        try:
            await ipr.addr(
                "add",
                index=index,
                address=address.compressed,
                prefixlen=128 if v6 else 32,
                flags=_IFA_F_NODAD if v6 else 0,
                proto=ADDRESS_PROTO,
            )
        except NetlinkError as exc:
            self._added.discard(address.compressed)
            log.error(
                "manage-addresses: cannot add %s to %s: %s", address, self._device, _refused(exc)
            )
            return
        log.info("manage-addresses: added %s to %s", address, self._device)

    async def _remove(self, ipr: Any, index: int, address: IPAddress) -> None:
        prefixlen = 128 if address.version == 6 else 32
        try:
            await ipr.addr("del", index=index, address=address.compressed, prefixlen=prefixlen)
        except NetlinkError as exc:
            if exc.code not in _GONE:
                log.error(
                    "manage-addresses: cannot remove %s from %s: %s",
                    address,
                    self._device,
                    _refused(exc),
                )
                return
        self._added.discard(address.compressed)
        log.info("manage-addresses: removed %s from %s", address, self._device)


@dataclass(frozen=True, slots=True)
class Cleanup:
    """What ``cleanup()`` found and did on one device: ``removed`` the addresses carrying
    ADDRESS_PROTO, kept ``others`` (not added by userproxy; IPv6 link-local left out)."""

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


def _unless_gone(exc: NetlinkError, what: str) -> None:
    """Raise ``exc`` as the OSError it is, unless it says the thing is already gone."""
    if exc.code not in _GONE:
        raise OSError(exc.code, f"{what}: {os.strerror(exc.code)}") from exc


async def cleanup(device: str = "userproxy0") -> Cleanup:
    """Remove what ``AddressManager``s left on ``device`` (kube-proxy's ``--cleanup``).

    Every address marked with ADDRESS_PROTO is removed, and the device is deleted if it
    carries DEVICE_ALIAS and no other address remains; nothing without the marks is touched.
    Idempotent.  Raises OSError (e.g. EPERM without CAP_NET_ADMIN) when netlink refuses."""
    try:
        async with netlink() as ipr:
            index = await _lookup(ipr, device)
            if index is None:
                return Cleanup(device, found=False)
            link = (await ipr.link("get", index=index))[0]
            marked = link.get_attr("IFLA_IFALIAS") == DEVICE_ALIAS
            removed: list[str] = []
            others: list[str] = []
            for a in await dump_addresses(ipr):
                if a.index != index:
                    continue
                if a.proto != ADDRESS_PROTO:
                    if not a.link_local:
                        others.append(a.text)
                    continue
                try:
                    await ipr.addr("del", index=index, address=a.text, prefixlen=a.prefixlen)
                except NetlinkError as exc:
                    _unless_gone(exc, f"cannot remove {a.text} from {device}")
                removed.append(a.text)
            deleted = marked and not others
            if deleted:
                try:
                    await ipr.link("del", index=index)
                except NetlinkError as exc:
                    _unless_gone(exc, f"cannot delete device {device}")
            return Cleanup(device, True, tuple(removed), tuple(others), marked, deleted)
    except NetlinkError as exc:  # from the lookups: report it as the OSError it is
        raise OSError(exc.code, f"{device}: {os.strerror(exc.code)}") from exc
