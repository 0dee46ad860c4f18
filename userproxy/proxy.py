"""Wires one proxy together and runs it: source -> recorder -> runner -> proxier -> effects.

Lifecycle (like uvicorn's): ``run()`` loads the manifests (a ManifestError here means the
process should exit 2), starts every long-lived task in one TaskGroup and waits for
``stop()``.  Shutdown is an explicit sequence: stop accepting on every listener, stop the
control plane, let open connections finish for up to ``shutdown_grace`` seconds, then abort
the rest; ``force_stop()`` (a second signal) ends the wait at once, and the managed
addresses are still removed.  ``reload(settings)`` (SIGHUP) takes on the settings listed in
``config.RELOADABLE`` while connections go on, and names the changed ones that need a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import platform
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from userproxy import __version__
from userproxy.admin.events import EventLog
from userproxy.admin.health import health_app
from userproxy.admin.metrics_server import metrics_app
from userproxy.admin.server import serve_app
from userproxy.admin.service_health import ServiceHealthServers
from userproxy.admin.status import StatusView
from userproxy.config import ConfigError, Settings, configz, flag_name, reloaded
from userproxy.control.handlers import Handlers
from userproxy.control.health import HealthState
from userproxy.control.proxier import Proxier, SyncStatus
from userproxy.control.runner import SyncRunner
from userproxy.control.trackers import ChangeRecorder
from userproxy.dataplane.access_log import AccessLog
from userproxy.dataplane.fast_relay import relay_name
from userproxy.effects import HostEffects, ServiceAddressSync
from userproxy.handoff.coordinator import Handoff
from userproxy.hostnet.address_device import AddressManager
from userproxy.hostnet.listen import SocketKey, socket_key
from userproxy.hostnet.node import NodeAddresses
from userproxy.logs import setup_logging
from userproxy.loop_lag import LoopLagProbe, build_line, loop_name
from userproxy.metrics import Metrics
from userproxy.proxy_setup import balancer_registry, listener_set
from userproxy.sources.manifests import ManifestError, ManifestSource

if TYPE_CHECKING:
    from kubernetes_asyncio.client import Configuration

    from userproxy.sources.reflector import EventKind

log = logging.getLogger(__name__)

#: Where tests and ``explain`` have always found it (it lives in proxy_setup.py).
_balancer_registry = balancer_registry


class Proxy:
    """One running proxy.  Build it, ``await run()``; call ``stop()`` from anywhere on the loop."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_synced: Callable[[SyncStatus], None] | None = None,
        feed: Callable[[Handlers], Awaitable[None]] | None = None,
        admin_socket: str | None = None,
    ) -> None:
        self.settings = settings
        #: A ``--workers`` data-plane process: the objects come from the parent's one
        #: source through ``feed`` (userproxy/workers/), not from manifests or the API.
        self._feed = feed
        #: A worker serves its metrics server's routes on this Unix socket, for the parent.
        self._admin_socket = admin_socket
        self.registry = _balancer_registry(settings)
        self.listeners = listener_set(settings, self.registry)
        self.limit = self.listeners.limit
        # The runner calls the proxier's sync and nothing else (kube-proxy's runner.go):
        # every effect of a sync goes through the HostEffects the proxier is given.  (A
        # lambda: the proxier is built below, from the recorder, which needs the runner.)
        self.runner = SyncRunner(
            lambda: self.proxier.sync_in_slices(),  # noqa: PLW0108
            min_interval=settings.min_sync_period,
            max_interval=settings.sync_period,
        )
        self.recorder = ChangeRecorder(settings.hostname, self.runner.request)
        self.metrics = Metrics()
        self.metrics.watch(self.recorder, self.listeners)
        self._on_synced = on_synced
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
        self.addresses: AddressManager | None = None
        self.address_sync: ServiceAddressSync | None = None
        if settings.manage_addresses:
            self.addresses = AddressManager(settings.address_device)
            self.address_sync = ServiceAddressSync(self.addresses)
        #: The status page's timeline, fed by the syncs (admin/status.py).
        self.events = EventLog()
        self.listeners.on_event = self.events.add
        effects = HostEffects(self.listeners, self.service_health, self.address_sync, self._synced)
        self.proxier = Proxier(
            self.recorder,
            effects,
            self.registry,
            node_addresses=self.node_addresses.nodeport_addresses,
        )
        self.proxier.endpoint_log.enabled = True
        self.proxier.endpoint_log.on_change = self.events.note_counts
        self.metrics.watch_endpoints(
            lambda: (c for plan in self.proxier.plans.values() for c in plan.endpoint_counts)
        )
        #: Event-loop lag, sampled 4 times a second by its own task (``run``).
        self.loop_lag = LoopLagProbe(self.metrics.observe_loop_lag)
        self.health = HealthState(self.recorder, self.proxier, settings.sync_period)
        self.status = StatusView(
            self.proxier, self.listeners, self.registry, self.events, settings.hostname
        )
        self.manifests: ManifestSource | None = None
        self._client_configuration: Configuration | None = None
        if settings.manifests and feed is None:
            self.manifests = ManifestSource(
                settings.manifests,
                self.recorder,
                node_name=settings.hostname,
                proxy_name=settings.service_proxy_name,
                poll_interval=settings.manifest_poll_interval,
                on_reload_error=self._reload_failed,
            )
        #: The admin servers' tasks by the key of the socket each listens on.
        self._admin_servers: dict[SocketKey, asyncio.Task[None]] = {}
        #: Set once each admin server listens (tests and the demo wait on these).
        self.health_ready = asyncio.Event()
        self.metrics_ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        #: What /configz serves: the settings in effect, updated in place by reload().
        self._configz: dict[str, object] = configz(settings)
        self.synced = asyncio.Event()
        self.stopped = asyncio.Event()
        self._next_sync = asyncio.Event()
        #: ``--handoff-socket``: take the listening sockets from a running proxy, and
        #: give them to the next one (userproxy/handoff/).
        self.handoff: Handoff | None = None
        if settings.handoff_socket is not None and feed is None:
            self.handoff = Handoff(
                settings,
                self.listeners,
                self.health,
                self.metrics,
                self._admin_servers,
                stop=self.stop,
                stopping=self._stop.is_set,
            )

    def _synced(self, status: SyncStatus) -> None:
        """A sync ended: record it, tell the caller, wake everyone waiting for it."""
        self.metrics.observe_sync(status, time.time())
        self.events.synced(status)
        if self._on_synced is not None:
            self._on_synced(status)
        if status.syncs:
            self.synced.set()
        # Wake everyone waiting for "a sync after N", then arm a fresh event.
        self._next_sync.set()
        self._next_sync = asyncio.Event()

    def _reload_failed(self, error: ManifestError) -> None:
        self.metrics.reload_errors.inc()
        self.events.reload_failed(error)

    def source_event(self, kind: EventKind, resource: str) -> None:
        """The API source reported ``kind`` for ``resource``: counted and on the timeline."""
        self.metrics.source_event(kind, resource)
        self.events.source_event(kind, resource)

    async def wait_sync(self, after: int) -> None:
        """Return once more than ``after`` syncs have been applied."""
        while self.proxier.status.syncs <= after:
            await self._next_sync.wait()

    def stop(self) -> None:
        """Begin the shutdown sequence (idempotent)."""
        self._stop.set()

    @property
    def handed_off(self) -> bool:
        """A successor took the listening sockets over (``--handoff-socket``)."""
        return self.handoff is not None and self.handoff.handed_off

    def force_stop(self) -> None:
        """Shut down without waiting for open connections (a second SIGTERM/SIGINT): they
        are reset at once, whether the grace period has begun or not; the managed addresses
        are still removed.  Idempotent."""
        self._stop.set()
        self._force.set()

    def reload(self, new: Settings) -> None:
        """Take on ``new``'s values of the RELOADABLE settings; log, in one line, what was
        applied and which changed settings need a restart (those keep their old value).

        Open connections and listeners are untouched: new timeouts apply from the next
        sweep (also to connections already open), a new ``shutdown_grace`` to the next
        shutdown, new sync periods from the runner's next wait.  The manifests are re-read
        (in the source's task).  ``self.settings`` and /configz show the settings in
        effect.  Never raises: a combination that fails validation (a file checked at
        start that is gone now) is logged and nothing changes."""
        try:
            effective, applied, restart = reloaded(self.settings, new)
        except ConfigError as exc:
            log.error("settings not reloaded, keeping the last good ones: %s", exc)
            return
        self.settings = effective
        if {"log_level", "log_format"} & set(applied):
            setup_logging(effective.log_level, effective.log_format)
        self.runner.set_intervals(effective.min_sync_period, effective.sync_period)
        self.health.timeout = 2 * effective.sync_period  # HealthState's rule, as at start
        self.listeners.timeouts = dataclasses.replace(
            self.listeners.timeouts,
            fin=effective.tcp_fin_timeout,
            idle=effective.tcp_idle_timeout,
        )
        self.listeners.endpoint_drain.after = effective.endpoint_drain
        table = self.listeners.udp_sessions
        table.settings = dataclasses.replace(
            table.settings, idle_timeout=effective.udp_idle_timeout
        )
        self._configz.clear()
        self._configz.update(configz(effective))
        if self.manifests is not None:
            self.manifests.request_reload()
        log.info(
            "reloaded the settings: applied %s; %s",
            ", ".join(f"{flag_name(n)}={getattr(effective, n)}" for n in applied) or "none",
            "needs a restart (kept as they were): " + ", ".join(map(flag_name, restart))
            if restart
            else "nothing needs a restart",
        )

    async def run(self) -> None:
        """Serve until ``stop()``; raises ManifestError if the first load fails and
        ConfigError if ``--manage-addresses`` cannot create its device."""
        if self.manifests is not None:
            self.manifests.initial_load()
        elif self._feed is None:
            # Read before anything starts: a kubeconfig that cannot be used (or a pod
            # without a ServiceAccount token) is a ConfigError now, not a failing task.
            from userproxy.sources.kubernetes import load_client_configuration

            self._client_configuration = await load_client_configuration(self.settings.kubeconfig)
        self._open_access_log()
        if self.handoff is not None:
            # After every check that ends the process with exit 2: a process that cannot
            # run never touches the running one.
            await self.handoff.take()
        if self.addresses is not None:
            try:
                await self.addresses.open()
            except OSError as exc:
                raise ConfigError(
                    f"--manage-addresses: cannot create device {self.settings.address_device}: "
                    f"{exc} (it needs CAP_NET_ADMIN)"
                ) from exc
        await self.node_addresses.refresh()  # read once before serving; then watched
        # After the checks that end the process with a message of their own (exit 2).
        loop = asyncio.get_running_loop()
        log.info("%s", build_line(loop))
        self.metrics.set_build_info(
            __version__, platform.python_version(), loop_name(loop), relay_name()
        )
        log.info(
            "userproxy serving %s as node %s (max %d connections, %d%% per Service, "
            "%d%% per client IP)",
            self.settings.source_description,
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
                    tasks.create_task(self.loop_lag.run(), name="loop-lag"),
                    tasks.create_task(
                        self.node_addresses.watch(self.runner.request), name="node-addresses"
                    ),
                    *self._admin_tasks(tasks),
                ]
                if self.address_sync is not None:
                    sync = self.address_sync.run()
                    control.append(tasks.create_task(sync, name="service-addresses"))
                if self.handoff is not None:
                    handoff = self.handoff.run(self.synced.wait)
                    control.append(tasks.create_task(handoff, name="handoff"))
                await self._stop.wait()
                if self.handed_off:
                    log.info("handed off: draining what is open")
                    await self.service_health.close()  # the successor answers them now
                else:
                    log.info("shutting down: no longer accepting connections")
                    self.listeners.stop_accepting()
                open_now = self.listeners.limit.active
                if open_now and self.settings.shutdown_grace and not self._force.is_set():
                    # Logged here, with the listeners closed, so the line comes before
                    # anything a client can see of the shutdown.
                    log.info(
                        "waiting up to %gs for %d open connections to finish "
                        "(stop again, e.g. a second SIGTERM or Ctrl-C, to close them now)",
                        self.settings.shutdown_grace,
                        open_now,
                    )
                # After a handoff, the admin servers the successor did not take over stay
                # up through the drain: their /healthz says "draining".
                serving = set(self._admin_servers.values()) if self.handed_off else set()
                for task in control:
                    if task not in serving:
                        task.cancel()
                aborted = await self._drain() if serving else None
                for task in serving:
                    task.cancel()
            if aborted is None:
                aborted = await self._drain()
            if aborted:
                log.warning(
                    "aborted %d connections still open %s",
                    aborted,
                    "(forced)" if self._force.is_set() else "after the grace period",
                )
            log.info("stopped")
        finally:
            await self.service_health.close()
            access_log, self.listeners.access_log = self.listeners.access_log, None
            if access_log is not None:  # after the drain: its aborted connections are in it
                await asyncio.to_thread(access_log.close)
            keep = self.handoff is not None and self.handoff.keep_addresses
            if self.addresses is not None and not keep:
                # Last: removing the addresses would break connections still draining.
                await self.addresses.close()
            self.stopped.set()

    def _open_access_log(self) -> None:
        """``--access-log``: opened before any listener exists, so every connection is in it."""
        path = self.settings.access_log
        if path is None:
            return
        try:
            self.listeners.access_log = AccessLog(path, self.settings.access_log_format)
        except OSError as exc:
            raise ConfigError(f"--access-log: cannot open {path}: {exc.strerror or exc}") from exc
        log.info("access log: %s (%s)", path, self.settings.access_log_format)

    async def _drain(self) -> int:
        """Wait up to ``shutdown_grace`` for open connections (after a handoff: and UDP
        sessions) to end, or until ``force_stop()``; abort the rest; the number aborted."""
        grace = 0.0 if self._force.is_set() else self.settings.shutdown_grace
        if self.handoff is not None and self.handoff.handed_off:
            grace = await self.handoff.wait_udp_sessions(grace, self._force)
        drain = asyncio.ensure_future(self.listeners.drain(grace))
        forced = asyncio.ensure_future(self._force.wait())
        try:
            await asyncio.wait({drain, forced}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            forced.cancel()
            if not drain.done():
                # Forced (or we are cancelled): stop waiting out the grace.
                drain.cancel()
                await asyncio.wait({drain})
        if drain.cancelled():
            return await self.listeners.drain(0.0)  # grace 0: abort every connection now
        return drain.result()

    async def _run_source(self) -> None:
        if self._feed is not None:
            await self._feed(self.recorder)
            return
        if self.manifests is not None:
            await self.manifests.run()
            return
        from userproxy.sources.kubernetes import run_api_source

        assert self._client_configuration is not None  # loaded by run()
        await run_api_source(
            self._client_configuration, self.recorder, self.settings, self.source_event
        )

    def _admin_tasks(self, tasks: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        servers: list[tuple[tuple[str, int] | str | None, str, asyncio.Event]] = [
            (self.settings.healthz_address, "health", self.health_ready),
            (self.settings.metrics_address, "metrics", self.metrics_ready),
            (self._admin_socket, "metrics", self.metrics_ready),
        ]
        started = []
        for address, name, ready in servers:
            if address is None:
                continue
            app = (
                health_app(self.health, self.metrics)
                if name == "health"
                else metrics_app(self.metrics, self.health, self._configz, self.status)
            )
            task = tasks.create_task(serve_app(app, address, name, ready))
            started.append(task)
            if not isinstance(address, str):  # a TCP address a successor may take over
                self._admin_servers[socket_key(socket.SOCK_STREAM, *address)] = task
        return started


__all__ = ["ManifestError", "Proxy"]
