"""Per-Service health-check servers (``spec.healthCheckNodePort``).

A Service with ``externalTrafficPolicy: Local`` and type LoadBalancer gets a health-check
NodePort; the cloud load balancer probes it on every node to learn which nodes have a
local endpoint.  As upstream kube-proxy (``pkg/proxy/healthcheck/service_health.go``)
answers it, any method and any path on that port gets

* 200 when the Service has at least one local endpoint and the proxy is healthy (the
  ``/healthz`` judgement: live and the Node eligible), 503 otherwise;
* ``Content-Type: application/json``, ``X-Content-Type-Options: nosniff`` and the body
  upstream prints, byte for byte (one tab per level, shown here as four spaces; no
  trailing newline)::

      {
          "service": {
              "namespace": "default",
              "name": "web"
          },
          "localEndpoints": 1,
          "serviceProxyHealthy": true
      }

Behaviour choices:

* **Addresses.**  Each port is bound on every address ``addresses()`` gives at the time
  the port is opened (the node's NodePort addresses).  An empty sequence means all
  addresses: ``0.0.0.0`` and ``::`` (``IPV6_V6ONLY``), which is the dual-stack wildcard
  upstream's Go listener gets; the ``::`` socket is skipped quietly where the host has no
  IPv6.  A port is all or nothing: if one address cannot be bound, none stays bound
  (upstream closes what it opened, too).  Specific addresses are bound with FREEBIND, so
  an address not (yet) on an interface does not fail the port; ``SO_REUSEADDR`` always.
* **Updates.**  A new endpoint count for a Service is stored and read per request: the
  port, its sockets and open keep-alive connections stay as they are.  A new port for a
  Service closes the old port and opens the new one.
* **Bind failures** (the port is taken by another process): logged, reported to
  ``on_error`` and listed by ``failed()``; ``retry_failed()`` tries again (upstream retries
  at every sync).  The log and ``on_error`` fire on the first failure and whenever the
  errno changes, not on every identical retry.
* **Two Services on one port** (the apiserver allocates these ports uniquely, so this is
  a misconfiguration or a transient during a reallocation): the first claim keeps the
  port; the later one is logged as an error naming both Services, reported to
  ``on_error`` as EADDRINUSE and listed by ``refused()``.  When the owner lets go of the
  port, the earliest waiting claimant takes it over without a rebind (upstream gets the
  same result from its retry at the next sync).
* **Malformed requests** get aiohttp's 400 and a closed connection; they are logged
  through ``http_logger`` (one line a second at most for all admin servers, no traceback).
* **Closing** a port stops listening at once (new clients are refused) and closes idle
  keep-alive connections; a request in flight gets ``SHUTDOWN_TIMEOUT`` seconds.

``apply`` and ``retry_failed`` are plain functions for the synchronous sync path; they
must run on the event loop's thread (they bind sockets synchronously and start serving in
a task owned here, one per open port; ``close()`` ends and awaits them all).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from aiohttp import web

from userproxy.admin.http_log import http_logger
from userproxy.model import ServiceKey

log = logging.getLogger(__name__)

#: What an empty ``addresses()`` means: every IPv4 and every IPv6 address.
ALL_ADDRESSES = ("0.0.0.0", "::")
BACKLOG = 128
#: How long a request in flight may take when its port closes.
SHUTDOWN_TIMEOUT = 1.0
#: Idle keep-alive connections are closed after this long (probers reconnect at will).
KEEPALIVE_TIMEOUT = 75.0
# Linux socket options Python does not name (linux/in.h, linux/in6.h).
IP_FREEBIND = 15
IPV6_FREEBIND = 78
#: errnos that mean "no IPv6 here" when binding the IPv6 wildcard.
_NO_IPV6 = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT})
_HEADERS = {"Content-Type": "application/json", "X-Content-Type-Options": "nosniff"}


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """What one Service's health-check port serves: its port and its local endpoints."""

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
    """The body upstream prints (Go's %q equals JSON quoting for Kubernetes names)."""
    service = check.service
    return (
        "{\n"
        '\t"service": {\n'
        f'\t\t"namespace": {json.dumps(service.namespace)},\n'
        f'\t\t"name": {json.dumps(service.name)}\n'
        "\t},\n"
        f'\t"localEndpoints": {check.local_endpoints},\n'
        f'\t"serviceProxyHealthy": {"true" if proxy_healthy else "false"}\n'
        "}"
    ).encode()


def bind_addresses(addresses: Sequence[str]) -> tuple[str, ...]:
    """The addresses a port is bound on: the given ones, deduplicated; empty means all."""
    return tuple(dict.fromkeys(addresses)) or ALL_ADDRESSES


def listen(address: str, port: int) -> socket.socket:
    """A non-blocking listening TCP socket on ``address:port``."""
    v6 = ":" in address
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if address not in ALL_ADDRESSES:
            # An address that is not local (yet) binds all the same and serves once it is.
            with contextlib.suppress(OSError):
                if v6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.setblocking(False)
        sock.bind((address, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(eq=False, slots=True)
class _Port:
    """One open port: sockets not yet handed to a server, the servers, and their task."""

    port: int
    sockets: list[socket.socket]
    web_server: web.Server
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    closing: bool = False
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def close(self) -> None:
        """Stop listening now (as far as the loop allows); the task finishes the rest."""
        self.closing = True
        for server in self.servers:
            server.close()
        for sock in self.sockets:  # never handed over: still ours to close
            sock.close()
        self.sockets.clear()
        self.stop.set()


class ServiceHealthServers:
    """The health-check ports of all Services, one HTTP server per port."""

    def __init__(
        self,
        health: Callable[[], bool],
        addresses: Callable[[], Sequence[str]],
        on_error: Callable[[int, OSError], None] | None = None,
    ) -> None:
        self._health = health
        self._addresses = addresses
        self._on_error = on_error
        #: Every Service's current claim, in claim order (the order decides conflicts).
        self._claims: dict[ServiceKey, HealthCheck] = {}
        #: port -> the Service it serves for (bound or not).
        self._owners: dict[int, ServiceKey] = {}
        self._open: dict[int, _Port] = {}
        self._failed: dict[int, OSError] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._answers: Counter[int] = Counter()
        self._closed = False

    # -- views ---------------------------------------------------------------------------
    def ports(self) -> dict[int, HealthCheck]:
        """The ports being served, with what each one answers for."""
        return {port: self._claims[self._owners[port]] for port in self._open}

    def failed(self) -> dict[int, FailedBind]:
        """Ports that should be served but could not be bound (retried by retry_failed)."""
        return {
            port: FailedBind(self._claims[self._owners[port]], error)
            for port, error in self._failed.items()
        }

    def refused(self) -> dict[ServiceKey, HealthCheck]:
        """Claims refused because another Service holds the port first."""
        return {
            service: check
            for service, check in self._claims.items()
            if self._owners.get(check.port) != service
        }

    def answers(self) -> dict[int, int]:
        """How many answers were given, by HTTP status code."""
        return dict(self._answers)

    # -- changes -------------------------------------------------------------------------
    def apply(self, service: ServiceKey, check: HealthCheck | None) -> None:
        """Make ``service``'s health check ``check`` (None: it has none any more)."""
        if check is not None and check.service != service:
            raise ValueError(f"health check of {check.service} applied to {service}")
        if self._closed:
            log.debug("health check of %s ignored: servers closed", service)
            return
        old = self._claims.get(service)
        if old is not None and check is not None and old.port == check.port:
            self._claims[service] = check  # read per request: nothing to reopen
            return
        if old is not None:
            del self._claims[service]
            self._release(old)
        if check is not None:
            self._claims[service] = check
            self._claim(check)

    def retry_failed(self) -> None:
        """Try again to bind the ports that failed (the port was taken, say)."""
        for port in list(self._failed):
            if port in self._owners and port not in self._open:
                self._open_port(port)

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
    def _claim(self, check: HealthCheck) -> None:
        port, service = check.port, check.service
        owner = self._owners.get(port)
        if owner is not None:
            message = (
                f"health check port {port} of {service} is already the health check port "
                f"of {owner}; not serving it for {service}"
            )
            log.error("%s", message)
            self._report(port, OSError(errno.EADDRINUSE, message))
            return
        self._owners[port] = service
        self._open_port(port)

    def _release(self, old: HealthCheck) -> None:
        port = old.port
        if self._owners.get(port) != old.service:
            return  # a refused claim: it held nothing
        successor = next((c.service for c in self._claims.values() if c.port == port), None)
        if successor is not None:
            # The handler answers for whoever owns the port: no rebind needed.
            self._owners[port] = successor
            log.info("health check port %d passes from %s to %s", port, old.service, successor)
            return
        del self._owners[port]
        self._failed.pop(port, None)
        entry = self._open.pop(port, None)
        if entry is not None:
            entry.close()
            log.info("health check of %s closed on port %d", old.service, port)

    def _open_port(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        service = self._owners[port]
        try:
            sockets = self._bind(port)
        except OSError as exc:
            self._fail(port, exc)
            return
        if self._failed.pop(port, None) is not None:
            log.info("health check of %s listening on port %d now", service, port)
        else:
            log.debug("health check of %s listening on port %d", service, port)
        web_server = web.Server(
            self._handler(port),
            loop=loop,
            access_log=None,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
            logger=http_logger("service-health"),
        )
        entry = _Port(port, sockets, web_server)
        self._open[port] = entry
        task = loop.create_task(self._serve(entry), name=f"service-health-{port}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _bind(self, port: int) -> list[socket.socket]:
        given = tuple(self._addresses())
        sockets: list[socket.socket] = []
        try:
            for address in bind_addresses(given):
                try:
                    sockets.append(listen(address, port))
                except OSError as exc:
                    if not given and address == "::" and exc.errno in _NO_IPV6:
                        log.debug("health check port %d: no IPv6 wildcard: %s", port, exc)
                        continue
                    raise
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return sockets

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
        loop = asyncio.get_running_loop()
        try:
            while entry.sockets and not entry.closing:
                sock = entry.sockets.pop(0)
                try:
                    server = await loop.create_server(entry.web_server, sock=sock)
                except OSError as exc:
                    sock.close()
                    if self._open.get(entry.port) is entry:
                        del self._open[entry.port]
                        entry.close()
                        self._fail(entry.port, exc)
                    return
                entry.servers.append(server)
                if entry.stop.is_set():  # closed while create_server awaited
                    server.close()
            await entry.stop.wait()
        except Exception:
            log.exception("health check server on port %d failed", entry.port)
        finally:
            entry.close()
            entry.web_server.pre_shutdown()
            try:
                await entry.web_server.shutdown(SHUTDOWN_TIMEOUT)
                for started in entry.servers:
                    await started.wait_closed()
            except Exception:
                log.exception("closing health check port %d", entry.port)

    def _handler(self, port: int) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        async def answer(_: web.BaseRequest) -> web.StreamResponse:
            return self._answer(port)

        return answer

    def _answer(self, port: int) -> web.Response:
        owner = self._owners.get(port)
        check = None if owner is None or port not in self._open else self._claims.get(owner)
        if check is None:  # the port is on its way out
            self._answers[503] += 1
            return web.Response(status=503, headers={"X-Content-Type-Options": "nosniff"})
        healthy = self._health()
        status = 200 if check.local_endpoints > 0 and healthy else 503
        self._answers[status] += 1
        return web.Response(status=status, body=render(check, healthy), headers=_HEADERS)
