"""What a sync changes on the host: the proxier's ``SyncEffects`` over the real parts.

The proxier (control/proxier.py) decides; this module carries the decisions out, on the
listener set (data plane), the per-Service health-check servers (admin) and the address
manager (hostnet), and tells the rest of the proxy that a sync ended.  It is the one place
where the control plane meets them, so control/ imports none of them.

Every call returns quickly.  Making the Service IPs local talks netlink, which can take
milliseconds per address; :class:`ServiceAddressSync` does it in a task of its own, always
working towards the newest wanted set, and retries an attempt that failed as a whole (no
netlink, no device) with a backoff; the proxier asks again at every sync meanwhile.  One
address the kernel refuses is logged by the address manager and tried again only when the
wanted set changes (a refusal such as EEXIST would repeat on every retry).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence

from userproxy.admin.service_health import ServiceHealthServers
from userproxy.control.proxier import SyncStatus
from userproxy.dataplane.listener_set import ListenerSet
from userproxy.hostnet.address_device import AddressManager
from userproxy.model import ListenerSpec, ServiceKey

log = logging.getLogger(__name__)

#: Retry delays of a failed address sync: doubling from the first to the last.
ADDRESS_RETRY = (0.5, 5.0)


class ServiceAddressSync:
    """Keeps the address manager converging on the newest wanted set, off the sync path.

    Invariants: at most one netlink update runs at a time; ``want`` never waits; ``error``
    is the last attempt's failure (None once an attempt succeeds).  ``run`` is the task.
    """

    def __init__(self, manager: AddressManager) -> None:
        self._manager = manager
        self._wanted: frozenset[str] | None = None
        self._applied: frozenset[str] | None = None
        self._wake = asyncio.Event()
        self.error: str | None = None

    def want(self, addresses: frozenset[str]) -> None:
        self._wanted = addresses
        if addresses != self._applied:
            self._wake.set()

    async def run(self) -> None:
        delay = ADDRESS_RETRY[0]
        while True:
            await self._wake.wait()
            self._wake.clear()
            wanted = self._wanted
            if wanted is None or wanted == self._applied:
                continue
            try:
                await self._manager.sync(wanted)
            except Exception as exc:
                if str(exc) != self.error:  # once per distinct error
                    log.warning("cannot make the Service IPs local: %s (will retry)", exc)
                self.error = str(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, ADDRESS_RETRY[1])
                self._wake.set()
            else:
                if self.error is not None:
                    log.info("the Service IPs are local again")
                self._applied, self.error = wanted, None
                delay = ADDRESS_RETRY[0]


class HostEffects:
    """The proxier's ``SyncEffects``: listeners, health checks, Service IPs, sync events."""

    def __init__(
        self,
        listeners: ListenerSet,
        health_checks: ServiceHealthServers,
        addresses: ServiceAddressSync | None,
        on_synced: Callable[[SyncStatus], None],
    ) -> None:
        self._listeners = listeners
        self._health_checks = health_checks
        self._addresses = addresses
        self._on_synced = on_synced

    def set_listeners(self, service: ServiceKey, specs: Sequence[ListenerSpec]) -> None:
        self._listeners.set_listeners(service, specs)

    def sync_health_checks(
        self, ports: Mapping[ServiceKey, int], local: Mapping[ServiceKey, int]
    ) -> bool:
        self._health_checks.sync_services(ports)
        self._health_checks.sync_endpoints(local)
        return not self._health_checks.failed()

    def sync_service_addresses(self, addresses: frozenset[str]) -> bool:
        if self._addresses is None:
            return True
        self._addresses.want(addresses)
        return self._addresses.error is None

    def synced(self, status: SyncStatus) -> None:
        self._on_synced(status)
