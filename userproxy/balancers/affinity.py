"""ClientIP session affinity wrapped around any balancer.

Kubernetes semantics: the key is the client IP alone; an entry lasts ``timeout`` seconds
and the timer restarts on every new connection from that client; an entry pointing at an
endpoint that left the pool is dropped; after a failed dial to the pinned endpoint the
client is re-pinned by the next pick (``failed`` forgets the entry).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Sequence

from userproxy.balancers.base import Balancer
from userproxy.model import Endpoint

#: Expired entries are swept after this many picks, so the table cannot grow without bound
#: between pool changes even when clients never come back.
_SWEEP_EVERY = 1024


class ClientIPAffinity:
    """Pins each client IP to the endpoint its first pick chose.

    Invariant: every entry of the table maps to an endpoint of the current pool.
    """

    __slots__ = ("_clock", "_inner", "_picks", "_table", "_timeout")

    def __init__(
        self,
        inner: Balancer,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
        table: dict[str, tuple[Endpoint, float]] | None = None,
    ) -> None:
        self._inner = inner
        self._timeout = timeout
        self._clock = clock
        self._picks = 0
        current = set(inner.endpoints)
        now = clock()
        # Carry over live pins to endpoints that stay; expired ones go here too, so a pool
        # that changes more often than the sweep interval cannot grow the table.
        self._table: dict[str, tuple[Endpoint, float]] = {
            ip: entry
            for ip, entry in (table or {}).items()
            if entry[0] in current and entry[1] > now
        }

    @property
    def endpoints(self) -> Sequence[Endpoint]:
        return self._inner.endpoints

    @property
    def timeout(self) -> float:
        return self._timeout

    def __len__(self) -> int:
        return len(self._table)

    def pick(self, client_ip: str, exclude: Container[Endpoint] = ()) -> Endpoint | None:
        now = self._clock()
        self._picks += 1
        if self._picks % _SWEEP_EVERY == 0:
            self._sweep(now)
        entry = self._table.get(client_ip)
        if entry is not None and entry[1] > now and entry[0] not in exclude:
            endpoint = entry[0]
        else:
            picked = self._inner.pick(client_ip, exclude)
            if picked is None:
                self._table.pop(client_ip, None)
                return None
            endpoint = picked
        self._table[client_ip] = (endpoint, now + self._timeout)
        return endpoint

    def failed(self, client_ip: str, endpoint: Endpoint) -> None:
        entry = self._table.get(client_ip)
        if entry is not None and entry[0] == endpoint:
            del self._table[client_ip]
        self._inner.failed(client_ip, endpoint)

    def renew(self, endpoints: Sequence[Endpoint]) -> Balancer:
        return ClientIPAffinity(
            self._inner.renew(endpoints), self._timeout, self._clock, self._table
        )

    def _sweep(self, now: float) -> None:
        expired = [ip for ip, (_, deadline) in self._table.items() if deadline <= now]
        for ip in expired:
            del self._table[ip]
