"""Process-wide limits of the data plane: open files and concurrent connections."""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
from collections.abc import Callable, Hashable

from userproxy.logs import RateLimitedLog

log = logging.getLogger(__name__)

#: File descriptors kept free for listeners, the admin servers, logs and the API client.
FD_RESERVE = 128


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, target, exc)
    return soft


def default_udp_sessions(nofile: int) -> int:
    """UDP sessions hold one descriptor each; they get a quarter of the budget."""
    return max(16, min(10_000, (nofile - FD_RESERVE) // 4))


def default_max_connections(nofile: int, udp_sessions: int = 0) -> int:
    """What the reserve and the UDP sessions leave, at two descriptors a TCP connection."""
    return max(16, min(100_000, (nofile - FD_RESERVE - udp_sessions) // 2))


_client_refused_log = RateLimitedLog(log, interval=5.0)
_service_full_log = RateLimitedLog(log, interval=5.0)


def share_of(maximum: int, percent: float) -> int:
    """``percent`` of ``maximum``, rounded up, at least 1; 100 or more: no bound of its
    own (``sys.maxsize``), only ``maximum`` applies."""
    if percent >= 100:
        return sys.maxsize
    return max(1, -(-maximum * round(percent * 100) // 10_000))


_Callbacks = tuple[Callable[[], None], Callable[[], None]]


class ConnectionLimit:
    """Counts open proxied connections, in all, per Service and per client IP, and applies
    three bounds in the accept path (a dict lookup each, per connection):

    * ``maximum`` (``--max-connections``): reached, every listener stops accepting and
      clients wait in the kernel's backlog (HAProxy's global ``maxconn``);
    * ``per_service`` (``--service-connection-share`` percent of it, default 50): a Service
      at it has its listeners stop accepting, so *its* new clients wait in the backlog while
      every other Service goes on accepting (HAProxy's per-frontend ``maxconn``);
    * ``per_client`` (``--client-connection-share``, default 25): a client IP at it has each
      further connection reset at once (HAProxy's ``tcp-request connection reject if {
      src_conn_cur ge N }``, Envoy's connection_limit filter).  Such a client cannot be
      left in the backlog: the accept queue is one FIFO for all clients, so holding one
      back would hold back everyone behind it.

    Invariants: ``active`` equals the sum of the per-Service counts and of the per-client
    counts; a key whose count drops to 0 is removed (both dicts hold only keys with open
    connections); a listener registered for Service ``s`` is told to pause when the total
    reaches ``maximum`` or ``s`` reaches ``per_service``, and to resume when it falls back
    below either (the listener's own ``_can_read`` asks ``blocked`` before it resumes, so a
    resume while the other bound still holds is harmless).
    """

    __slots__ = (
        "_by_service",
        "_clients",
        "_emptied",
        "_listeners",
        "_service_of",
        "_services",
        "active",
        "maximum",
        "per_client",
        "per_service",
    )

    def __init__(
        self, maximum: int, *, service_share: float = 100, client_share: float = 100
    ) -> None:
        self.maximum = maximum
        self.per_service = share_of(maximum, service_share)
        self.per_client = share_of(maximum, client_share)
        self.active = 0
        self._services: dict[Hashable, int] = {}
        self._clients: dict[str | None, int] = {}
        self._emptied: asyncio.Future[None] | None = None
        self._listeners: dict[object, _Callbacks] = {}
        #: Each registered owner's Service, so unregistering finds it at once.
        self._service_of: dict[object, Hashable] = {}
        self._by_service: dict[Hashable, dict[object, _Callbacks]] = {}

    @property
    def full(self) -> bool:
        return self.active >= self.maximum

    def blocked(self, service: Hashable = None) -> bool:
        """Whether a listener of ``service`` must not accept now (total or its share)."""
        return self.active >= self.maximum or self._services.get(service, 0) >= self.per_service

    def service_connections(self, service: Hashable) -> int:
        return self._services.get(service, 0)

    def client_connections(self, client: str) -> int:
        return self._clients.get(client, 0)

    def register(
        self,
        owner: object,
        pause: Callable[[], None],
        resume: Callable[[], None],
        service: Hashable = None,
    ) -> None:
        self.unregister(owner)  # registering again moves it
        self._listeners[owner] = (pause, resume)
        self._service_of[owner] = service
        self._by_service.setdefault(service, {})[owner] = (pause, resume)

    def unregister(self, owner: object) -> None:
        if self._listeners.pop(owner, None) is None:
            return
        service = self._service_of.pop(owner)
        owners = self._by_service[service]
        del owners[owner]
        if not owners:
            del self._by_service[service]

    def acquire(self, service: Hashable = None, client: str | None = None) -> bool:
        """Count a new connection of ``client`` to ``service``; False (nothing counted)
        when the client already holds its share: the caller resets the connection."""
        clients = self._clients
        held = clients.get(client, 0)
        if held >= self.per_client:
            _client_refused_log.log(
                logging.WARNING,
                "client %s holds %d connections, its share of --max-connections %d "
                "(--client-connection-share): its new connections are reset",
                client,
                held,
                self.maximum,
            )
            return False
        clients[client] = held + 1
        count = self._services.get(service, 0) + 1
        self._services[service] = count
        self.active += 1
        if self.active == self.maximum:
            log.warning("connection limit %d reached; accepting paused", self.maximum)
            for pause, _ in list(self._listeners.values()):
                pause()
        elif count == self.per_service:
            _service_full_log.log(
                logging.WARNING,
                "Service %s holds %d connections, its share of --max-connections %d "
                "(--service-connection-share): its new clients wait until one closes",
                service,
                count,
                self.maximum,
            )
            for pause, _ in list(self._by_service.get(service, {}).values()):
                pause()
        return True

    def release(self, service: Hashable = None, client: str | None = None) -> None:
        clients = self._clients
        held = clients[client] - 1
        if held:
            clients[client] = held
        else:
            del clients[client]
        count = self._services[service] - 1
        if count:
            self._services[service] = count
        else:
            del self._services[service]
        self.active -= 1
        if self.active == 0 and self._emptied is not None and not self._emptied.done():
            self._emptied.set_result(None)
        if self.active == self.maximum - 1:
            for _, resume in list(self._listeners.values()):
                resume()
        elif count == self.per_service - 1:
            for _, resume in list(self._by_service.get(service, {}).values()):
                resume()

    async def wait_empty(self) -> None:
        """Return once no connection is open."""
        if self.active == 0:
            return
        if self._emptied is None or self._emptied.done():
            self._emptied = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._emptied)


def warn_if_over_nofile(maximum: int, nofile: int, udp_sessions: int) -> None:
    """Warn when the connection limit cannot be reached: each proxied TCP connection holds
    two descriptors, and the UDP sessions and a reserve take theirs first.  Past that,
    accepts fail with EMFILE instead of waiting at the limit, so say what can be served."""
    servable = max(0, (nofile - FD_RESERVE - udp_sessions) // 2)
    if maximum > servable:
        log.warning(
            "the connection limit (--max-connections) is %d, but the open-files limit %d "
            "(less %d for UDP sessions and %d reserved, two per connection) serves only %d "
            "connections; raise the limit (ulimit -n, LimitNOFILE) or lower the setting",
            maximum,
            nofile,
            udp_sessions,
            FD_RESERVE,
            servable,
        )
