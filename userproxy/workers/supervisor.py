"""The ``--workers N`` parent: one source, N data-plane workers, restarted when they die.

The parent reads the manifests or watches the API (one watch per resource, whatever N is)
into a ``Forwarder``, which sends every handler call to every worker; a worker that starts
(or restarts) first gets the replay of the current objects (``forwarder.py``).  The parent
serves the metrics and health ports itself, from the workers' private admin sockets
(``admin.py``).

Lifecycle: ``run()`` loads the manifests (a ManifestError: exit 2 before any worker starts)
or the kubeconfig, starts the workers and the admin servers and waits for ``stop()``.
``stop()`` sends SIGTERM to every worker, which shuts down as ``userproxy run`` does
(``--shutdown-grace``); ``force_stop()`` sends a second one, which resets their open
connections now.  ``run()`` returns once every worker has exited; whatever way it ends, no
worker is left running (SIGKILL in the ``finally``; and ``PR_SET_PDEATHSIG`` plus the
closed channel in the worker, for a parent killed outright).

A worker that exits while the parent is not stopping is started again after a backoff
(0.1 s, doubling up to 10 s; back to 0.1 s once a worker has run for 30 s); the others keep
serving meanwhile, their sockets sharing the addresses with SO_REUSEPORT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

from userproxy import __version__
from userproxy.config import ConfigError, Settings, reloaded
from userproxy.dataplane.fast_relay import relay_name
from userproxy.logs import setup_logging
from userproxy.loop_lag import loop_name
from userproxy.metrics import Metrics
from userproxy.sources.manifests import ManifestError, ManifestSource
from userproxy.workers.channel import Call, Hello, Reload, encode
from userproxy.workers.forwarder import Forwarder

if TYPE_CHECKING:
    import aiohttp
    from kubernetes_asyncio.client import Configuration

    from userproxy.sources.reflector import EventKind

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0
#: A worker that ran this long before it died is restarted after BACKOFF_FIRST again.
HEALTHY_RUN = 30.0


@dataclass
class WorkerSlot:
    """One of the N workers: its current process (None between a death and its restart)."""

    number: int
    admin_socket: str
    process: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    restarts: int = 0
    started_at: float = 0.0
    #: The HTTP client of its admin socket (``admin.py``), made on first use.
    session: aiohttp.ClientSession | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.alive and self.process is not None else None


class Supervisor:
    """The parent of ``settings.workers`` workers.  Build it, ``await run()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.forwarder = Forwarder(self._broadcast)
        self.metrics = Metrics()
        registry = self.metrics.registry
        Gauge("userproxy_workers", "Data-plane worker processes configured", registry=registry).set(
            settings.workers
        )
        self.worker_up = Gauge(
            "userproxy_worker_up", "1 while the worker process runs", ["worker"], registry=registry
        )
        self.worker_restarts = Counter(
            "userproxy_worker_restarts",
            "Worker processes started again after they exited",
            ["worker"],
            registry=registry,
        )
        self._dir = tempfile.mkdtemp(prefix="userproxy-workers-")
        self.slots = [
            WorkerSlot(n, os.path.join(self._dir, f"worker-{n}.sock"))
            for n in range(settings.workers)
        ]
        for slot in self.slots:
            self.worker_up.labels(str(slot.number)).set(0)
            self.worker_restarts.labels(str(slot.number))
        self.manifests: ManifestSource | None = None
        if settings.manifests:
            self.manifests = ManifestSource(
                settings.manifests,
                self.forwarder,
                node_name=settings.hostname,
                proxy_name=settings.service_proxy_name,
                poll_interval=settings.manifest_poll_interval,
                on_reload_error=lambda _error: self.metrics.reload_errors.inc(),
            )
        self._client_configuration: Configuration | None = None
        self._stop = asyncio.Event()
        self.health_ready = asyncio.Event()
        self.metrics_ready = asyncio.Event()

    # -- control ------------------------------------------------------------------------

    def stop(self) -> None:
        """Begin the shutdown: SIGTERM to every worker (idempotent per call count)."""
        self._stop.set()
        self._signal_workers(signal.SIGTERM)

    def force_stop(self) -> None:
        """A second SIGTERM to every worker: they reset their open connections now."""
        self._stop.set()
        self._signal_workers(signal.SIGTERM)

    def reload(self, settings: Settings) -> None:
        """SIGHUP: the workers take on the new settings (``Proxy.reload``, which logs what
        it applied and what needs a restart); the parent takes on the same RELOADABLE
        ones (its log settings, /configz); the manifests are read again."""
        try:
            self.settings, applied, _restart = reloaded(self.settings, settings)
        except ConfigError as exc:
            log.error("settings not reloaded, keeping the last good ones: %s", exc)
            return
        if {"log_level", "log_format"} & set(applied):
            setup_logging(self.settings.log_level, self.settings.log_format)
        frame = encode(Reload(settings))
        for slot in self.slots:
            if slot.writer is not None:
                slot.writer.write(frame)
        if self.manifests is not None:
            self.manifests.request_reload()

    def _signal_workers(self, signum: int) -> None:
        for slot in self.slots:
            if slot.alive and slot.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signum)

    def _broadcast(self, call: Call) -> None:
        frame = encode(call)
        for slot in self.slots:
            if slot.writer is not None:
                slot.writer.write(frame)

    # -- running ------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until ``stop()`` and every worker has exited (see the module)."""
        from userproxy.workers.admin import admin_tasks

        try:
            if self.manifests is not None:
                self.manifests.initial_load()  # ManifestError: exit 2, no worker started
            else:
                from userproxy.sources.kubernetes import load_client_configuration

                self._client_configuration = await load_client_configuration(
                    self.settings.kubeconfig
                )
            loop = asyncio.get_running_loop()
            self.metrics.set_build_info(
                __version__, platform.python_version(), loop_name(loop), relay_name()
            )
            log.info(
                "userproxy serving %s as node %s with %d worker processes",
                self.settings.source_description,
                self.settings.hostname,
                self.settings.workers,
            )
            async with asyncio.TaskGroup() as tasks:
                source = tasks.create_task(self._run_source(), name="source")
                admin = admin_tasks(self, tasks)
                workers = [
                    tasks.create_task(self._keep_running(slot), name=f"worker-{slot.number}")
                    for slot in self.slots
                ]
                await self._stop.wait()
                log.info("shutting down: stopping %d workers", len(self.slots))
                source.cancel()
                await asyncio.wait(workers)
                for task in admin:
                    task.cancel()
            log.info("stopped")
        finally:
            for slot in self.slots:
                if slot.alive and slot.process is not None:
                    with contextlib.suppress(ProcessLookupError):
                        slot.process.kill()
                    await slot.process.wait()
                if slot.session is not None:
                    await slot.session.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    async def _keep_running(self, slot: WorkerSlot) -> None:
        """Run ``slot``'s worker; start it again after a backoff whenever it exits, until
        the parent stops."""
        failures = 0
        while not self._stop.is_set():
            await self._spawn(slot)
            assert slot.process is not None
            if self._stop.is_set():  # stop() came while it was starting
                slot.process.send_signal(signal.SIGTERM)
            status = await slot.process.wait()
            writer = slot.writer
            slot.writer = None
            if writer is not None:
                writer.close()
            self.worker_up.labels(str(slot.number)).set(0)
            if self._stop.is_set():
                log.info("worker %d (pid %d) exited (%d)", slot.number, slot.process.pid, status)
                return
            ran = time.monotonic() - slot.started_at
            failures = 0 if ran >= HEALTHY_RUN else failures + 1
            delay = min(BACKOFF_FIRST * 2 ** max(failures - 1, 0), BACKOFF_MAX)
            log.error(
                "worker %d (pid %d) exited with status %d after %.1fs; starting it again in %gs",
                slot.number,
                slot.process.pid,
                status,
                ran,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if not self._stop.is_set():
                slot.restarts += 1
                self.worker_restarts.labels(str(slot.number)).inc()

    async def _spawn(self, slot: WorkerSlot) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(slot.admin_socket)  # a killed worker leaves its socket file
        ours, theirs = socket.socketpair()
        try:
            slot.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "userproxy.workers.child",
                str(theirs.fileno()),
                str(os.getpid()),
                pass_fds=(theirs.fileno(),),
                # Its own session: a Ctrl-C in the terminal reaches the parent only, which
                # stops the workers in order.
                start_new_session=True,
            )
        finally:
            theirs.close()
        slot.started_at = time.monotonic()
        _, writer = await asyncio.open_connection(sock=ours)
        # From here to the assignment nothing awaits: no change can fall between the
        # replay and the first forwarded call (forwarder.py's invariant).
        hello = Hello(slot.number, len(self.slots), self.settings, slot.admin_socket)
        writer.write(encode(hello))
        for call in self.forwarder.replay():
            writer.write(encode(call))
        slot.writer = writer
        self.worker_up.labels(str(slot.number)).set(1)
        log.info("worker %d started (pid %d)", slot.number, slot.process.pid)

    async def _run_source(self) -> None:
        if self.manifests is not None:
            await self.manifests.run()
            return
        from userproxy.sources.kubernetes import run_api_source

        assert self._client_configuration is not None  # loaded by run()
        await run_api_source(
            self._client_configuration, self.forwarder, self.settings, self._source_event
        )

    def _source_event(self, kind: EventKind, resource: str) -> None:
        self.metrics.source_event(kind, resource)


__all__ = ["ManifestError", "Supervisor", "WorkerSlot"]
