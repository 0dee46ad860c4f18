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
import time
from collections.abc import Callable

from userproxy.admin.health import health_app
from userproxy.admin.metrics_server import metrics_app
from userproxy.admin.server import serve_app
from userproxy.admin.service_health import HealthCheck, ServiceHealthServers
from userproxy.balancers.registry import BalancerRegistry
from userproxy.config import ConfigError, Settings, configz
from userproxy.control.health import HealthState
from userproxy.control.proxier import Proxier, SyncStatus
from userproxy.control.runner import SyncRunner
from userproxy.control.trackers import ChangeRecorder
from userproxy.dataplane.limits import (
    ConnectionLimit,
    default_max_connections,
    default_udp_sessions,
    raise_nofile_limit,
)
from userproxy.dataplane.listeners import ListenerSet, TcpTimeouts
from userproxy.dataplane.udp import UdpSettings
from userproxy.hostnet.addresses import AddressManager
from userproxy.hostnet.node import NodeAddresses
from userproxy.metrics import Metrics
from userproxy.model import ServiceKey
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
        udp_sessions = settings.udp_max_sessions or default_udp_sessions(nofile)
        maximum = settings.max_connections or default_max_connections(nofile, udp_sessions)
        self.registry = BalancerRegistry()
        self.limit = ConnectionLimit(
            maximum,
            service_share=settings.service_connection_share,
            client_share=settings.client_connection_share,
        )
        self.listeners = ListenerSet(
            self.registry,
            self.limit,
            TcpTimeouts(
                fin=settings.tcp_fin_timeout,
                idle=settings.tcp_idle_timeout,
            ),
            UdpSettings(
                idle_timeout=settings.udp_idle_timeout,
                max_sessions=udp_sessions,
                session_rate=settings.udp_session_rate,
            ),
        )
        self.runner = SyncRunner(
            self._sync,
            min_interval=settings.min_sync_period,
            max_interval=settings.sync_period,
        )
        self.recorder = ChangeRecorder(settings.hostname, self.runner.request)
        self.metrics = Metrics()
        self.metrics.watch(self.recorder, self.listeners)

        def synced(status: SyncStatus) -> None:
            self.metrics.observe_sync(status, time.time())
            if on_synced is not None:
                on_synced(status)

        self.service_health = ServiceHealthServers(
            health=lambda: self.health.report().healthy,
            addresses=lambda: self.proxier.node_addresses,
            on_error=lambda _port, _exc: self.metrics.health_check_bind_errors.inc(),
        )
        #: Watched by its own task (``run``): a new node address asks for a sync at once.
        self.node_addresses = NodeAddresses(
            self.listeners.node_local,
            nodeport_cidrs=settings.nodeport_addresses,
            cluster_cidrs=settings.cluster_cidr.split(",") if settings.cluster_cidr else (),
            own_device=settings.address_device if settings.manage_addresses else None,
        )
        self.proxier = Proxier(
            self.recorder,
            self.listeners,
            self.registry,
            on_synced=synced,
            node_addresses=self.node_addresses,
            health_checks=self._apply_health_check,
        )
        self.health = HealthState(self.recorder, self.proxier, settings.sync_period)
        self.addresses: AddressManager | None = None
        if settings.manage_addresses:
            self.addresses = AddressManager(settings.address_device)
        self._managed: frozenset[str] = frozenset()
        self._addresses_error: str | None = None
        self.manifests: ManifestSource | None = None
        if settings.manifests:
            self.manifests = ManifestSource(
                settings.manifests,
                self.recorder,
                node_name=settings.hostname,
                proxy_name=settings.service_proxy_name,
                poll_interval=settings.manifest_poll_interval,
                on_reload_error=lambda _: self.metrics.reload_errors.inc(),
            )
        #: Set once each admin server listens (tests and the demo wait on these).
        self.health_ready = asyncio.Event()
        self.metrics_ready = asyncio.Event()
        self._stop = asyncio.Event()
        self.synced = asyncio.Event()
        self.stopped = asyncio.Event()
        self._next_sync = asyncio.Event()

    def _apply_health_check(self, service: ServiceKey, port: int | None, local: int) -> None:
        check = None if port is None else HealthCheck(service, port, local)
        self.service_health.apply(service, check)

    async def _sync(self) -> bool:
        """One sync; False when something could not be applied (the runner retries).

        The proxier's part yields to the loop every few milliseconds: a sync that
        re-plans thousands of Services must not pause the data plane."""
        complete = await self.proxier.sync_in_slices()
        if self.addresses is not None:
            wanted = self.proxier.service_addresses()
            if wanted != self._managed:
                try:
                    self.addresses.sync(wanted)
                except Exception as exc:  # retried with the sync; _managed stays as it was
                    complete = False
                    if str(exc) != self._addresses_error:  # once per distinct error
                        self._addresses_error = str(exc)
                        log.warning("cannot make the Service IPs local: %s (will retry)", exc)
                else:
                    self._managed = wanted
                    self._addresses_error = None
        self.service_health.retry_failed()
        if self.service_health.failed():
            complete = False
        if self.proxier.status.syncs:
            self.synced.set()
        # Wake everyone waiting for "a sync after N", then arm a fresh event.
        self._next_sync.set()
        self._next_sync = asyncio.Event()
        return complete

    async def wait_sync(self, after: int) -> None:
        """Return once more than ``after`` syncs have been applied."""
        while self.proxier.status.syncs <= after:
            await self._next_sync.wait()

    def stop(self) -> None:
        """Begin the shutdown sequence (idempotent)."""
        self._stop.set()

    async def run(self) -> None:
        """Serve until ``stop()``; raises ManifestError if the first load fails and
        ConfigError if ``--manage-addresses`` cannot create its device."""
        if self.manifests is not None:
            self.manifests.initial_load()
        if self.addresses is not None:
            try:
                self.addresses.open()
            except OSError as exc:
                raise ConfigError(
                    f"--manage-addresses: cannot create device {self.settings.address_device}: "
                    f"{exc} (it needs CAP_NET_ADMIN)"
                ) from exc
        log.info(
            "userproxy serving %s as node %s (max %d connections, %d%% per Service, "
            "%d%% per client IP)",
            self._source_description(),
            self.settings.hostname,
            self.limit.maximum,
            self.settings.service_connection_share,
            self.settings.client_connection_share,
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                control = [
                    tasks.create_task(self.runner.run(), name="sync-runner"),
                    tasks.create_task(self._run_source(), name="source"),
                    tasks.create_task(self.listeners.run_sweeper(), name="sweeper"),
                    tasks.create_task(
                        self.node_addresses.watch(self.runner.request), name="node-addresses"
                    ),
                    *self._admin_tasks(tasks),
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
            await self.service_health.close()
            if self.addresses is not None:
                # Last: removing the addresses would break connections still draining.
                self.addresses.close()
            self.stopped.set()

    def _source_description(self) -> str:
        settings = self.settings
        if settings.manifests:
            return "manifests " + ", ".join(map(str, settings.manifests))
        if settings.kubeconfig is not None:
            return f"the API server of {settings.kubeconfig}"
        return "the API server (in-cluster configuration)"

    async def _run_source(self) -> None:
        if self.manifests is not None:
            await self.manifests.run()
            return
        from userproxy.sources.kubernetes import KubernetesSource, make_api_client

        api = await make_api_client(self.settings.kubeconfig)
        try:
            source = KubernetesSource(
                api,
                self.recorder,
                node_name=self.settings.hostname,
                proxy_name=self.settings.service_proxy_name,
                resync_period=self.settings.config_sync_period,
                on_event=self.metrics.source_event,
            )
            await source.run()
        finally:
            await api.close()

    def _admin_tasks(self, tasks: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        started = []
        health_address = self.settings.healthz_address
        if health_address is not None:
            app = health_app(self.health, self.metrics)
            started.append(
                tasks.create_task(serve_app(app, health_address, "health", self.health_ready))
            )
        metrics_address = self.settings.metrics_address
        if metrics_address is not None:
            app = metrics_app(self.metrics, self.health, configz(self.settings))
            started.append(
                tasks.create_task(serve_app(app, metrics_address, "metrics", self.metrics_ready))
            )
        return started


__all__ = ["ManifestError", "Proxy"]
