"""Wires one proxy together and runs it: source -> recorder -> runner -> proxier -> listeners.

Lifecycle (like uvicorn's): ``run()`` loads the manifests (a ManifestError here means the
process should exit 2), starts every long-lived task in one TaskGroup and waits for
``stop()``.  Shutdown is an explicit sequence: stop accepting on every listener, stop the
control plane, let open connections finish for up to ``shutdown_grace`` seconds, then abort
the rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from userproxy.balancers.registry import BalancerRegistry
from userproxy.config import Settings
from userproxy.control.proxier import Proxier, SyncStatus
from userproxy.control.runner import SyncRunner
from userproxy.control.trackers import ChangeRecorder
from userproxy.dataplane.limits import ConnectionLimit, default_max_connections, raise_nofile_limit
from userproxy.dataplane.listeners import ListenerSet, TcpTimeouts
from userproxy.sources.manifests import ManifestError, ManifestSource

log = logging.getLogger(__name__)


class Proxy:
    """One running proxy.  Build it, ``await run()``; call ``stop()`` from anywhere on the loop."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_synced: Callable[[SyncStatus], None] | None = None,
    ) -> None:
        self.settings = settings
        nofile = raise_nofile_limit()
        maximum = settings.max_connections or default_max_connections(nofile)
        self.registry = BalancerRegistry()
        self.limit = ConnectionLimit(maximum)
        self.listeners = ListenerSet(
            self.registry,
            self.limit,
            TcpTimeouts(
                fin=settings.tcp_fin_timeout,
                idle=settings.tcp_idle_timeout,
                drain_grace=settings.shutdown_grace,
            ),
        )
        self.runner = SyncRunner(
            self._sync,
            min_interval=settings.min_sync_period,
            max_interval=settings.sync_period,
        )
        self.recorder = ChangeRecorder(settings.hostname, self.runner.request)
        self.proxier = Proxier(self.recorder, self.listeners, self.registry, on_synced=on_synced)
        self.source = ManifestSource(
            settings.manifests,
            self.recorder,
            node_name=settings.hostname,
            proxy_name=settings.service_proxy_name,
            poll_interval=settings.manifest_poll_interval,
        )
        self._stop = asyncio.Event()
        self.synced = asyncio.Event()
        self.stopped = asyncio.Event()
        self._next_sync = asyncio.Event()

    def _sync(self) -> None:
        self.proxier.sync()
        if self.proxier.status.syncs:
            self.synced.set()
        # Wake everyone waiting for "a sync after N", then arm a fresh event.
        self._next_sync.set()
        self._next_sync = asyncio.Event()

    async def wait_sync(self, after: int) -> None:
        """Return once more than ``after`` syncs have been applied."""
        while self.proxier.status.syncs <= after:
            await self._next_sync.wait()

    def stop(self) -> None:
        """Begin the shutdown sequence (idempotent)."""
        self._stop.set()

    async def run(self) -> None:
        """Serve until ``stop()``; raises ManifestError if the first load fails."""
        self.source.initial_load()
        log.info(
            "userproxy serving manifests %s as node %s (max %d connections)",
            ", ".join(map(str, self.settings.manifests)),
            self.settings.hostname,
            self.limit.maximum,
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                control = [
                    tasks.create_task(self.runner.run(), name="sync-runner"),
                    tasks.create_task(self.source.run(), name="manifest-source"),
                    tasks.create_task(self.listeners.run_sweeper(), name="sweeper"),
                ]
                await self._stop.wait()
                log.info("shutting down: no longer accepting connections")
                self.listeners.stop_accepting()
                for task in control:
                    task.cancel()
            aborted = await self.listeners.drain(self.settings.shutdown_grace)
            if aborted:
                log.warning("aborted %d connections still open after the grace period", aborted)
            log.info("stopped")
        finally:
            self.stopped.set()


__all__ = ["ManifestError", "Proxy"]
