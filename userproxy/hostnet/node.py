"""The node's own addresses as the proxy needs them, kept fresh by a netlink watcher.

Two consumers: the proxier (which addresses NodePorts listen on: ``--nodeport-addresses``,
never the service IPs on the proxy's own device) and the listeners' traffic classifier
(which clients are on this node: every local address, plus ``--cluster-cidr``).

``watch()`` is the proxy's task for this: it subscribes to the kernel's address events
(``RTMGRP_IPV4_IFADDR`` and ``RTMGRP_IPV6_IFADDR`` on a ``NETLINK_ROUTE`` socket the loop
reads with ``add_reader``), and after each burst of events re-reads the addresses on a
worker thread, updates the classifier, and asks for a sync only when the NodePort addresses
changed.  So a new node address gets its NodePort listeners within a sync's time, not at the
next periodic sync (kube-proxy's iptables mode matches NodePorts with ``--dst-type LOCAL``,
so there a new address works at once), and the sync itself reads no netlink on the loop.
Where the netlink socket cannot be opened it polls every ``POLL_INTERVAL`` seconds instead,
on the worker thread likewise.

Invariants: while ``watch()`` runs and has read once, calling the object returns what the
last read found (or raises what the last read raised: the proxier then keeps the previous
addresses and fails the sync, which is retried) and never touches netlink; without a
watcher it reads itself, at most once per ``REFRESH_INTERVAL``.  Only the loop's thread
changes the cached values (a worker thread only reads the kernel).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence

from userproxy.dataplane.classify import NodeLocal
from userproxy.hostnet.addresses import (
    local_addresses,
    primary_addresses,
    select_nodeport_addresses,
)

log = logging.getLogger(__name__)

#: How often the node's addresses are re-read at most without a watcher.
REFRESH_INTERVAL = 1.0
#: Without a netlink socket (or after a failed read), how often the watcher re-reads.
POLL_INTERVAL = 1.0
#: After an event, how long the watcher waits for more before reading: adding many
#: addresses at once (``--manage-addresses`` on a large sync) is one read, not thousands.
DEBOUNCE = 0.05
# linux/rtnetlink.h multicast groups.
_RTMGRP_IPV4_IFADDR = 0x10
_RTMGRP_IPV6_IFADDR = 0x100

#: (every local address, the NodePort addresses), as one read of the kernel finds them.
_Read = tuple[frozenset[str], tuple[str, ...]]


def _open_address_events() -> socket.socket | None:
    """A non-blocking netlink socket receiving address add/remove events, or None."""
    try:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE
        )
    except (OSError, AttributeError) as exc:
        log.info("no netlink address events (%s); node addresses polled every second", exc)
        return None
    try:
        sock.bind((0, _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV6_IFADDR))
    except OSError as exc:
        sock.close()
        log.info("no netlink address events (%s); node addresses polled every second", exc)
        return None
    return sock


class NodeAddresses:
    """Callable giving the NodePort addresses; keeps ``node_local`` up to date on the way."""

    def __init__(
        self,
        node_local: NodeLocal,
        *,
        nodeport_cidrs: Sequence[str] = (),
        cluster_cidrs: Sequence[str] = (),
        own_device: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._node_local = node_local
        self._nodeport_cidrs = tuple(nodeport_cidrs)
        self._cluster_cidrs = tuple(cluster_cidrs)
        self._exclude = (own_device,) if own_device else ()
        self._clock = clock
        self._read_at = float("-inf")
        self._nodeport: tuple[str, ...] = ()
        #: True while ``watch()`` keeps the cache fresh (after its first read).
        self._watched = False
        #: What the watcher's last read raised (None: it succeeded).
        self._error: Exception | None = None

    def __call__(self) -> tuple[str, ...]:
        if self._watched:
            if self._error is not None:
                raise self._error
            return self._nodeport
        now = self._clock()
        if now - self._read_at < REFRESH_INTERVAL:
            return self._nodeport
        self._read_at = now
        self._store(self._read())
        return self._nodeport

    def _read(self) -> _Read:
        """Read the kernel (blocking netlink: ~ms; the watcher calls it on a thread)."""
        local = local_addresses()
        # Service IPs on the proxy's own device are not node addresses for NodePorts.
        candidates = local_addresses(exclude_devices=self._exclude) if self._exclude else local
        primary = (
            primary_addresses(exclude_devices=self._exclude)
            if "primary" in self._nodeport_cidrs
            else ()
        )
        return local, select_nodeport_addresses(self._nodeport_cidrs, candidates, primary)

    def _store(self, read: _Read) -> bool:
        """Take a read in (on the loop's thread); True when the NodePort addresses changed."""
        local, nodeport = read
        self._node_local.update(local, self._cluster_cidrs)
        changed = nodeport != self._nodeport
        self._nodeport = nodeport
        return changed

    async def watch(self, on_change: Callable[[], None]) -> None:
        """Forever: follow the node's addresses and call ``on_change`` (ask for a sync)
        when the NodePort addresses change, or when reading works again after failing."""
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
        first = True
        try:
            while True:
                wake.clear()  # before reading: an event during the read reads again
                try:
                    # The first read waits (a few ms, once, as the first sync's read did):
                    # the proxy is settled, with no netlink socket of a read in flight,
                    # by the time it serves; later ones run beside the loop.
                    read = self._read() if first else await asyncio.to_thread(self._read)
                except Exception as exc:
                    first = self._error is None or str(self._error) != str(exc)
                    self._error = exc
                    self._watched = True
                    if first:  # once per distinct error; the sync's retries report it
                        log.warning("cannot read the node's addresses: %s (will retry)", exc)
                        on_change()
                else:
                    recovered = self._error is not None
                    self._error = None
                    changed = self._store(read)
                    self._watched = True
                    if changed:
                        log.info("NodePort addresses now: %s", ", ".join(self._nodeport))
                    if changed or recovered:
                        on_change()
                first = False
                poll = events is None or self._error is not None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_INTERVAL if poll else None):
                        await wake.wait()
                await asyncio.sleep(DEBOUNCE)
        finally:
            self._watched = False
            if events is not None:
                loop.remove_reader(events.fileno())
                events.close()
