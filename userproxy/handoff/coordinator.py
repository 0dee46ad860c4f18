"""One proxy's side of handoffs, both ways, within its lifecycle (proxy.py calls it).

1. ``take()``, after every check that can end the process with exit 2 and before anything
   listens: checks the path (exit 2 if it is unsafe), asks a running process for its
   listening sockets, and offers them to ``listening_socket`` (hostnet/listen.py).
2. ``run(synced)``, a task of the proxy: once the first sync is applied (this process
   serves: its listeners took the sockets they want), tells the old process, closes the
   received sockets nothing took (this process's view has no listener there, so the
   kernel refuses, as a fresh start would), and then (or at once, when nothing was taken
   over, after the first sync) listens on the path itself and gives its own sockets to
   the next process.  Cancelling it stops listening (the file is unlinked if it is still
   this process's).
3. As the old side (``giver.Host``): ``offer()`` lists every listening socket,
   ``hand_off()`` stops accepting when a successor serves, then the proxy stops, drains
   with ``wait_udp_sessions`` first, and keeps the managed addresses if the successor
   adopted them (``keep_addresses``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping

from userproxy.config import Settings
from userproxy.control.health import HealthState
from userproxy.dataplane.listener_set import SWEEP_INTERVAL, ListenerSet
from userproxy.handoff import path as handoff_path
from userproxy.handoff.giver import Giver, Offered
from userproxy.handoff.taker import HandoffRefused, Takeover, connect
from userproxy.hostnet.listen import SocketKey, inherit, inherited_left, open_sockets, socket_key
from userproxy.metrics import Metrics

log = logging.getLogger(__name__)

__all__ = ["Handoff", "HandoffRefused"]


class Handoff:
    """``--handoff-socket`` for one proxy, whose parts it is given.

    ``admin_servers`` (the proxy fills it as its servers start): the task serving each
    TCP admin address, stopped when a successor takes that address over; ``stop``: ends
    the proxy's serving (after a handoff, its drain); ``stopping``: whether it stops."""

    def __init__(
        self,
        settings: Settings,
        listeners: ListenerSet,
        health: HealthState,
        metrics: Metrics,
        admin_servers: Mapping[SocketKey, asyncio.Task[None]],
        *,
        stop: Callable[[], None],
        stopping: Callable[[], bool],
    ) -> None:
        assert settings.handoff_socket is not None
        self.path = settings.handoff_socket
        self.settings = settings
        self.listeners = listeners
        self.health = health
        self.metrics = metrics
        self.admin_servers = admin_servers
        self._stop = stop
        self._stopping = stopping
        #: The device whose addresses this process manages (a successor adopts them).
        self._device = settings.address_device if settings.manage_addresses else None
        self._takeover: Takeover | None = None
        #: A successor took the listening sockets over: this process drains.
        self.handed_off = False
        #: Whether the managed addresses stay on the device at exit: a successor adopted
        #: them, or this process is taking over (and may still fail: the old one needs them).
        self.keep_addresses = False
        #: Set when this process listens on the path (tests and the bench wait on it).
        self.listening = asyncio.Event()

    # -- the new process's side ----------------------------------------------------------
    async def take(self) -> None:
        """Step 1 (see the module docstring); ConfigError for an unsafe path,
        HandoffRefused when the old process cannot be taken over from."""
        handoff_path.check(self.path)
        takeover = await connect(self.path, self._device)
        if takeover is None:
            return
        inherit((key, sock) for key, sock, _serves in takeover.sockets)
        self._takeover = takeover
        self.keep_addresses = True

    async def run(self, synced: Callable[[], Awaitable[object]]) -> None:
        """Step 2: wait for ``synced()``, finish a takeover, then serve the path."""
        takeover, self._takeover = self._takeover, None
        try:
            await synced()
        except BaseException:
            if takeover is not None:
                takeover.abandon()
                for _key, sock in inherited_left():
                    sock.close()
            raise
        if takeover is not None:
            await self._finish(takeover)
        bound = handoff_path.bind(self.path)
        giver = Giver(bound, self, self._given, self._refused)
        log.info("handoff: listening on %s for a successor", self.path)
        self.listening.set()
        try:
            await giver.serve()
        finally:
            giver.close()

    async def _finish(self, takeover: Takeover) -> None:
        left = inherited_left()
        received = {key for key, _sock, _serves in takeover.sockets}
        taken = received - {key for key, _sock in left}
        confirmed = await takeover.finish(taken, self._device)
        # After the old process stopped accepting: until then the sockets were its too.
        for key, sock in left:
            log.info("handoff: not serving %s %s:%d (no listener wants it here)", *key)
            sock.close()
        self.metrics.handoffs.labels("taken").inc()
        self.keep_addresses = False  # this process owns them now
        # An address the old process opened after it listed its sockets is free now.
        self.listeners.retry_binds_soon()
        log.info(
            "handoff: took over %d of %d listening sockets from pid %d%s",
            len(taken),
            len(received),
            takeover.giver_pid,
            "" if confirmed else " (it went away before confirming)",
        )

    # -- the old process's side (giver.Host) ---------------------------------------------
    @property
    def draining(self) -> bool:
        """Stopping, or handed off: no handoff may start."""
        return self._stopping() or self.handed_off

    def offer(self) -> list[Offered]:
        """Every listening socket this process holds, with what it serves."""
        serves = {
            socket_key(listener.SOCK_TYPE, listener.spec.ip, listener.spec.port): str(
                listener.spec.spn
            )
            for listener in self.listeners
            if listener.listening
        }
        for name, address in (
            ("healthz", self.settings.healthz_address),
            ("metrics", self.settings.metrics_address),
        ):
            if address is not None:
                serves[socket_key(socket.SOCK_STREAM, *address)] = name
        return [
            Offered(key, sock, serves.get(key, "health check port")) for key, sock in open_sockets()
        ]

    def expect_successor(self, addresses_device: str | None) -> None:
        """Keep the managed addresses at exit while a successor on the same device holds
        the sockets (it adopts them), also if this process is stopped before it serves.
        After the handoff nothing changes it: the successor serves, whatever came next."""
        if not self.handed_off:
            self.keep_addresses = addresses_device is not None and addresses_device == self._device

    def hand_off(self, taken: set[SocketKey], addresses_device: str | None) -> None:
        """A successor serves now: stop accepting (TCP connections go on, UDP sessions
        still get their replies), stop serving the admin sockets it took, report
        draining; ``_given`` then stops the proxy, which drains."""
        self.handed_off = True
        self.health.draining = True
        self.listeners.stop_accepting(keep_udp_replies=True)
        for key, task in self.admin_servers.items():
            if key in taken:
                task.cancel()
        if addresses_device is not None and addresses_device == self._device:
            self.keep_addresses = True

    def _given(self) -> None:
        self.metrics.handoffs.labels("given").inc()
        self._stop()

    def _refused(self, reason: str) -> None:
        self.metrics.handoff_refusals.labels(reason).inc()

    async def wait_udp_sessions(self, grace: float, forced: asyncio.Event) -> float:
        """After a handoff: sweep (idle timeouts) while UDP sessions are kept for their
        replies, for up to ``grace`` seconds or until ``forced``; the grace left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.listeners.sessions_replying() and not forced.is_set():
            left = deadline - loop.time()
            if left <= 0:
                break
            await asyncio.sleep(min(SWEEP_INTERVAL, left))
            await self.listeners.sweep(loop.time())
        return 0.0 if forced.is_set() else max(0.0, deadline - loop.time())
