"""Per-Service health-check servers (``spec.healthCheckNodePort``).

A LoadBalancer Service with ``externalTrafficPolicy: Local`` gets a health-check NodePort
that the cloud load balancer probes on every node to learn which nodes have a local
endpoint.  As upstream kube-proxy (``pkg/proxy/healthcheck/service_health.go``) answers
it, any method and any path on that port gets 200 when the Service has a local endpoint
and the proxy is healthy (the ``/healthz`` judgement), 503 otherwise, with
``Content-Type: application/json``, ``X-Content-Type-Options: nosniff`` and upstream's
body byte for byte (one tab per level, shown here as four spaces; no trailing newline)::

      {
          "service": {
              "namespace": "default",
              "name": "web"
          },
          "localEndpoints": 1,
          "serviceProxyHealthy": true
      }

Behaviour choices:

* **Addresses.**  A port is bound on every address ``addresses()`` gives when it opens
  (the NodePort addresses); none means ``0.0.0.0`` and ``::`` (``IPV6_V6ONLY``, the
  ``::`` one skipped quietly without IPv6), the dual-stack wildcard of upstream's Go
  listener.  A port is all or nothing (upstream closes what it opened, too).  Specific
  addresses are bound with FREEBIND, so one not (yet) on an interface does not fail.
* **Bind failures** (the port is taken): logged and reported to ``on_error`` on the first
  failure and whenever the errno changes, and listed by ``failed()`` until bound.
* **Two Services on one port** (the apiserver allocates these ports uniquely: a
  misconfiguration or a transient): the holder keeps it, else the claim the map lists
  first wins; each other claim is logged naming both Services, reported to ``on_error``
  as EADDRINUSE once and listed by ``refused()``.  When the owner lets go, the earliest
  waiting claimant takes the port over without a rebind (upstream gets there by its
  retry at the next sync).
* **Closing** a port stops listening at once and closes idle keep-alive connections; a
  request in flight gets ``SHUTDOWN_TIMEOUT`` seconds.

Updates follow upstream's two calls, ``sync_services`` and ``sync_endpoints``.  Each open
port is an aiohttp ``ServerRunner`` with one ``SockSite`` per socket, bound synchronously:
``sync_services`` is a plain function that must run on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

from aiohttp import web

from userproxy.admin.http_log import http_logger
from userproxy.hostnet.listen import listening_socket
from userproxy.model import ServiceKey

log = logging.getLogger(__name__)

#: What an empty ``addresses()`` means: every IPv4 and every IPv6 address.
ALL_ADDRESSES = ("0.0.0.0", "::")
BACKLOG = 128
#: How long a request in flight may take when its port closes.
SHUTDOWN_TIMEOUT = 1.0
#: Idle keep-alive connections are closed after this long (probers reconnect at will).
KEEPALIVE_TIMEOUT = 75.0
#: errnos that mean "no IPv6 here" when binding the IPv6 wildcard.
_NO_IPV6 = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT})
_HEADERS = {"Content-Type": "application/json", "X-Content-Type-Options": "nosniff"}


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """What one health-check port answers for: its Service and its local endpoints."""

    service: ServiceKey
    port: int
    local_endpoints: int

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"health check port {self.port} of {self.service} out of range")
        if self.local_endpoints < 0:
            raise ValueError(f"negative local endpoint count for {self.service}")


@dataclass(frozen=True, slots=True)
class FailedBind:
    """A port whose owner wants it served but that could not be bound (yet)."""

    check: HealthCheck
    error: OSError


def render(check: HealthCheck, proxy_healthy: bool) -> bytes:
    """The body upstream prints: its Go template's layout is JSON indented by tabs (and
    Go's %q quotes Kubernetes names as JSON does)."""
    body = {
        "service": {"namespace": check.service.namespace, "name": check.service.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    }
    return json.dumps(body, indent="\t").encode()


def bind_addresses(addresses: Sequence[str]) -> tuple[str, ...]:
    """The addresses a port is bound on: the given ones, deduplicated; empty means all."""
    return tuple(dict.fromkeys(addresses)) or ALL_ADDRESSES


def listen_all(addresses: Sequence[str], port: int) -> list[socket.socket]:
    """Listening sockets on ``port`` at every one of ``addresses`` (empty: both wildcards,
    the IPv6 one skipped quietly where the host has no IPv6), or none: OSError."""
    sockets: list[socket.socket] = []
    try:
        for address in bind_addresses(addresses):
            try:
                freebind = address not in ALL_ADDRESSES
                sockets.append(listening_socket(address, port, freebind=freebind, backlog=BACKLOG))
            except OSError as exc:
                if not addresses and address == "::" and exc.errno in _NO_IPV6:
                    log.debug("health check port %d: no IPv6 wildcard: %s", port, exc)
                    continue
                raise
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _Site(web.SockSite):
    """A SockSite that can stop listening at once: aiohttp's ``stop()`` is a coroutine,
    but closing the listening server needs no await (the runner's cleanup closes it again,
    which is a no-op, and then the connections)."""

    __slots__ = ()

    def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()


@dataclass(eq=False, slots=True)
class _Port:
    """One open port: bound sockets not yet handed to a site, the sites, the stop signal."""

    port: int
    sockets: list[socket.socket]
    sites: list[_Site] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def close(self) -> None:
        """Stop listening now; the serving task closes the connections."""
        for site in self.sites:
            site.stop_listening()
        for sock in self.sockets:  # never handed to a site: still ours to close
            sock.close()
        self.sockets.clear()
        self.stop.set()


class ServiceHealthServers:
    """The health-check ports of all Services, one aiohttp server runner per port."""

    def __init__(
        self,
        health: Callable[[], bool],
        addresses: Callable[[], Sequence[str]],
        on_error: Callable[[int, OSError], None] | None = None,
    ) -> None:
        self._health = health
        self._addresses = addresses
        self._on_error = on_error
        #: Service -> its health-check port, in claim order (the order decides conflicts).
        self._claims: dict[ServiceKey, int] = {}
        #: Local ready endpoints per Service (absent: none), read per request.
        self._local: dict[ServiceKey, int] = {}
        #: port -> the Service it answers for (bound or not).
        self._owners: dict[int, ServiceKey] = {}
        self._open: dict[int, _Port] = {}
        self._failed: dict[int, OSError] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._answers: Counter[int] = Counter()
        self._closed = False

    # -- views ---------------------------------------------------------------------------
    def ports(self) -> dict[int, HealthCheck]:
        """The ports being served, with what each one answers for."""
        return {port: self._check(self._owners[port]) for port in self._open}

    def failed(self) -> dict[int, FailedBind]:
        """Ports that should be served but could not be bound (retried by sync_services)."""
        return {
            port: FailedBind(self._check(self._owners[port]), error)
            for port, error in self._failed.items()
        }

    def refused(self) -> dict[ServiceKey, HealthCheck]:
        """Claims refused because another Service holds the port first."""
        return {service: self._check(service) for service, _ in self._refused_claims()}

    def answers(self) -> dict[int, int]:
        """How many answers were given, by HTTP status code."""
        return dict(self._answers)

    # -- changes -------------------------------------------------------------------------
    def sync_services(self, ports: Mapping[ServiceKey, int]) -> None:
        """Serve exactly these health-check ports (Service -> port; absent: none), and try
        again the ones that could not be bound before (upstream's ``SyncServices``)."""
        for service, port in ports.items():
            HealthCheck(service, port, 0)  # raises for a port out of range
        if self._closed:
            log.debug("health checks ignored: servers closed")
            return
        refused_before = self._refused_claims()
        # A claim that stays keeps its place in the queue; a new or moved one goes last.
        kept = {
            service: port for service, port in self._claims.items() if ports.get(service) == port
        }
        self._claims = kept | dict(ports)
        holders = {port: owner for port, owner in self._owners.items() if kept.get(owner) == port}
        owners: dict[int, ServiceKey] = {}
        for service, port in self._claims.items():
            owners.setdefault(port, holders.get(port, service))
        for port, old in self._owners.items():
            if port not in owners:
                self._close_port(port, old)
            elif owners[port] != old:  # the handler answers for the owner: no rebind
                log.info("health check port %d passes from %s to %s", port, old, owners[port])
        self._owners = owners
        for service, port in self._refused_claims() - refused_before:
            message = (
                f"health check port {port} of {service} is already the health check port "
                f"of {owners[port]}; not serving it for {service}"
            )
            log.error("%s", message)
            self._report(port, OSError(errno.EADDRINUSE, message))
        for port in owners.keys() - self._open.keys():
            self._open_port(port)

    def sync_endpoints(self, local: Mapping[ServiceKey, int]) -> None:
        """Each Service's local ready endpoints (absent: none), read per request
        (upstream's ``SyncEndpoints``): no port opens or closes."""
        for service, count in local.items():
            if count < 0:
                raise ValueError(f"negative local endpoint count for {service}")
        self._local = dict(local)

    async def close(self) -> None:
        """Close every port and wait for the servers to finish."""
        self._closed = True
        for entry in self._open.values():
            entry.close()
        self._open.clear()
        self._failed.clear()
        self._owners.clear()
        self._claims.clear()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- internals -----------------------------------------------------------------------
    def _check(self, service: ServiceKey) -> HealthCheck:
        return HealthCheck(service, self._claims[service], self._local.get(service, 0))

    def _refused_claims(self) -> set[tuple[ServiceKey, int]]:
        return {(s, port) for s, port in self._claims.items() if self._owners.get(port) != s}

    def _close_port(self, port: int, service: ServiceKey) -> None:
        self._failed.pop(port, None)
        entry = self._open.pop(port, None)
        if entry is not None:
            entry.close()
            log.info("health check of %s closed on port %d", service, port)

    def _open_port(self, port: int) -> None:
        try:
            sockets = listen_all(self._addresses(), port)
        except OSError as exc:
            self._fail(port, exc)
            return
        service = self._owners[port]
        if self._failed.pop(port, None) is not None:
            log.info("health check of %s listening on port %d now", service, port)
        else:
            log.debug("health check of %s listening on port %d", service, port)
        entry = _Port(port, sockets)
        self._open[port] = entry
        task = asyncio.get_running_loop().create_task(
            self._serve(entry), name=f"service-health-{port}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail(self, port: int, exc: OSError) -> None:
        previous = self._failed.get(port)
        self._failed[port] = exc
        if previous is not None and previous.errno == exc.errno:
            return
        log.error(
            "health check of %s cannot listen on port %d: %s (will retry)",
            self._owners[port],
            port,
            exc.strerror or exc,
        )
        self._report(port, exc)

    def _report(self, port: int, exc: OSError) -> None:
        if self._on_error is None:
            return
        try:
            self._on_error(port, exc)
        except Exception:
            log.exception("health check error callback failed")

    async def _serve(self, entry: _Port) -> None:
        """Hand each socket to a site, wait for the stop signal, then clean up: the
        runner closes the sites, idle connections and, after SHUTDOWN_TIMEOUT, the rest."""
        server = web.Server(
            partial(self._answer, entry.port),
            access_log=None,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
            logger=http_logger("service-health"),
        )
        runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_TIMEOUT)
        try:
            await runner.setup()
            while entry.sockets:  # close() empties it: nothing more is handed over
                sock = entry.sockets.pop(0)
                site = _Site(runner, sock, backlog=BACKLOG)
                entry.sites.append(site)
                try:
                    await site.start()
                except OSError as exc:
                    sock.close()
                    if self._open.get(entry.port) is entry:
                        del self._open[entry.port]
                        self._fail(entry.port, exc)
                    return
            await entry.stop.wait()
        except Exception:
            log.exception("health check server on port %d failed", entry.port)
        finally:
            entry.close()
            try:
                await runner.cleanup()
            except Exception:
                log.exception("closing health check port %d", entry.port)

    async def _answer(self, port: int, _: web.BaseRequest) -> web.Response:
        owner = self._owners.get(port)
        if owner is None or port not in self._open:  # the port is on its way out
            self._answers[503] += 1
            return web.Response(status=503, headers={"X-Content-Type-Options": "nosniff"})
        check = self._check(owner)
        healthy = self._health()
        status = 200 if check.local_endpoints > 0 and healthy else 503
        self._answers[status] += 1
        return web.Response(status=status, body=render(check, healthy), headers=_HEADERS)
