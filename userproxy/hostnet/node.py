"""The node's own addresses as the proxy needs them, kept fresh by a netlink watcher.

Two consumers: the proxier (which addresses NodePorts listen on: ``--nodeport-addresses``,
never the service IPs on the proxy's own device) and the listeners' traffic classifier
(which clients are on this node: every local address, plus ``--cluster-cidr``; kube-proxy's
LocalTrafficDetector answers the same question).

The proxy awaits one ``refresh()`` before it serves, then runs ``watch()``: it subscribes to
the kernel's address events (a raw ``NETLINK_ROUTE`` socket read with ``add_reader``), reads
once more (so no change before the subscription is lost) and again after each burst of
events.  The events are not decoded, they only wake the watcher (pyroute2's subscription
would decode each on the loop and reopen its socket after an overflow).  So a new node
address gets its NodePort listeners within a sync's time (kube-proxy's iptables mode
matches ``--dst-type LOCAL``, so there it works at once), and syncs read no netlink.

Invariants: ``nodeport_addresses()`` never touches netlink: it returns what the last read
found, or raises what the last read raised (before any read: LookupError); the proxier
then keeps the previous addresses and fails the sync, which is retried.  Only the loop's
thread reads and changes the cached values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Sequence

from userproxy.dataplane.classify import NodeLocal
from userproxy.hostnet.host_addresses import read_host, select_nodeport_addresses

log = logging.getLogger(__name__)

#: Without a netlink socket (or after a failed read), how often the watcher re-reads.
POLL_INTERVAL = 1.0
#: After an event, how long the watcher waits for more before reading: adding many
#: addresses at once (``--manage-addresses`` on a large sync) is one read, not thousands.
DEBOUNCE = 0.05
# linux/rtnetlink.h multicast groups.
_RTMGRP_IPV4_IFADDR = 0x10
_RTMGRP_IPV6_IFADDR = 0x100


def _open_address_events() -> socket.socket | None:
    """A non-blocking netlink socket receiving address add/remove events, or None."""
    sock = None
    try:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE
        )
        sock.bind((0, _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV6_IFADDR))
    except (OSError, AttributeError) as exc:
        if sock is not None:
            sock.close()
        log.info("no netlink address events (%s); node addresses polled every second", exc)
        return None
    return sock


class NodeAddresses:
    """The NodePort addresses (``nodeport_addresses()``); keeps ``node_local`` up to date."""

    def __init__(
        self,
        node_local: NodeLocal,
        *,
        nodeport_cidrs: Sequence[str] = (),
        cluster_cidrs: Sequence[str] = (),
        own_device: str | None = None,
    ) -> None:
        self._node_local = node_local
        self._nodeport_cidrs = tuple(nodeport_cidrs)
        self._cluster_cidrs = tuple(cluster_cidrs)
        self._exclude = (own_device,) if own_device else ()
        self._nodeport: tuple[str, ...] = ()
        #: What the last read raised (None: it succeeded).
        self._error: Exception | None = LookupError("the node's addresses were not read yet")

    def nodeport_addresses(self) -> tuple[str, ...]:
        """The NodePort addresses of the last read; raises what the last read raised."""
        if self._error is not None:
            raise self._error
        return self._nodeport

    async def refresh(self) -> bool:
        """Read the host once and take it in.  True when a sync should follow: the NodePort
        addresses changed, reading failed with a new error, or it works again."""
        primary = "primary" in self._nodeport_cidrs
        try:
            host = await read_host(routes=primary)
            local = host.local()
            # Service IPs on the proxy's own device are not node addresses for NodePorts.
            nodeport = select_nodeport_addresses(
                self._nodeport_cidrs,
                host.local(self._exclude),
                host.primary(self._exclude) if primary else (),
            )
        except Exception as exc:
            new = self._error is None or str(self._error) != str(exc)
            self._error = exc
            if new:  # once per distinct error; the sync's retries report it
                log.warning("cannot read the node's addresses: %s (will retry)", exc)
            return new
        recovered = self._error is not None
        self._error = None
        self._node_local.update(local, self._cluster_cidrs)
        changed = nodeport != self._nodeport
        self._nodeport = nodeport
        if changed:
            log.info("NodePort addresses now: %s", ", ".join(nodeport))
        return changed or recovered

    async def watch(self, on_change: Callable[[], None]) -> None:
        """Forever: follow the node's addresses and call ``on_change`` (ask for a sync)
        when the NodePort addresses change, or when reading fails or works again."""
        loop = asyncio.get_running_loop()
        events = _open_address_events()
        wake = asyncio.Event()

        def drain() -> None:
            assert events is not None
            while True:
                try:
                    if not events.recv(65536):
                        break
                except BlockingIOError:
                    break
                except OSError:
                    # ENOBUFS: the kernel dropped events (a burst overflowed the socket's
                    # buffer); a re-read below covers whatever they said.
                    continue
            wake.set()

        if events is not None:
            loop.add_reader(events.fileno(), drain)
        try:
            while True:
                wake.clear()  # before reading: an event during the read reads again
                if await self.refresh():
                    on_change()
                poll = events is None or self._error is not None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_INTERVAL if poll else None):
                        await wake.wait()
                await asyncio.sleep(DEBOUNCE)
        finally:
            if events is not None:
                loop.remove_reader(events.fileno())
                events.close()
