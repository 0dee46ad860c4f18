"""ClientIP session affinity wrapped around any balancer, with one pin table per Service port.

Kubernetes semantics: the key is the client IP alone; a pin lasts ``timeout`` seconds and
the timer restarts on every new connection from that client; a pin to an endpoint that
left is dropped; after a failed dial to the pinned endpoint the client is re-pinned by the
next pick (``failed`` forgets the pin).

Scope, after kube-proxy's iptables mode: the "recent" lists it checks
(``-m recent --name KUBE-SEP-xxx --rcheck --seconds N --reap``) belong to the endpoint chain
KUBE-SEP-xxx of one ServicePortName, and the ClusterIP, NodePort, externalIP and
load-balancer rules all jump through the same KUBE-SVC/KUBE-SVL chains to those KUBE-SEP
chains.  So a client pinned through the ClusterIP stays on its endpoint when it comes in
through a NodePort of the same Service port.  Hence one ``AffinityTable`` per
ServicePortName (``AffinityTables``), shared by every pool of that port: every address
kind, both traffic classes.

A pool only uses a pin to an endpoint it contains: kube-proxy writes the ``--rcheck`` rule
of an endpoint only into the chains that list that endpoint, so a KUBE-SVL chain
(``externalTrafficPolicy: Local``) never sends a client to a remote endpoint it was pinned
to through the ClusterIP.  Such a pool picks anew and the pin moves to the new endpoint.
Here kube-proxy remembers the client in both endpoints' lists, and a later ClusterIP
connection goes to whichever of the two comes first in the KUBE-SVC chain; userproxy keeps
one pin per client, the endpoint it used last, as the legacy userspace proxier did (one
affinity entry per client in a service port's ``LoadBalancerRR`` state).  Pins are keyed
by the endpoint's address ("ip:port"), as KUBE-SEP chains are, so a change of an endpoint's
conditions (ready -> serving and terminating) does not unpin its clients.

With ``--workers N`` (N > 1) each data-plane process has its own tables, and the kernel
hands a client's connections to any of them, so a pin one worker made is unknown to the
others.  There ``ClientIPAffinity.deterministic`` is set and the pick is a rendezvous
(highest random weight) hash of the client IP over the pool's endpoint addresses: every
worker computes the same endpoint with no shared state.  The trade-off against kube-proxy's
first-pick-then-stick (docs/workers.md): the client keeps its endpoint while that endpoint
stays in the pool, whatever the timeout; when an endpoint joins, about 1/(n+1) of the
clients move to it at once (kube-proxy keeps them until their timeout); when one leaves,
only its clients move (as in kube-proxy).  The pins are still written, so ``/explain``
shows them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Container, Iterable, Sequence
from typing import ClassVar

from userproxy.balancers.base import Balancer
from userproxy.model import Endpoint, ListenerSpec, ServiceKey, ServicePortName

#: Expired pins are swept after this many lookups, so the table cannot grow without bound
#: between pool changes even when clients never come back (iptables' ``--reap``).
_SWEEP_EVERY = 1024

#: An endpoint's address as a pin names it: "ip:port" (a str caches its hash).
Address = str


class AffinityTable:
    """Client IP -> (endpoint address, time of the last connection) for one Service port.

    Invariants: a pin is live while ``now - last < timeout`` (kube-proxy's
    ``--rcheck --seconds``); ``get`` drops an expired pin it meets and every
    ``_SWEEP_EVERY`` lookups all expired pins, so the table holds the clients seen within
    the timeout plus at most the clients of one sweep interval; ``retain`` drops pins to
    endpoints outside the given set.  ``timeout`` may change in place: kube-proxy keeps
    the recent lists when it rewrites the rules with a new ``--seconds``, so existing pins
    are judged by the new timeout.
    """

    __slots__ = ("clock", "lookups", "pins", "timeout")

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self.clock = clock
        #: Lookups since the start, for the sweep (``ClientIPAffinity.pick`` counts too).
        self.lookups = 0
        #: Client IP -> (endpoint address, last connection); ``ClientIPAffinity.pick``
        #: reads and writes it directly (the per-connection path).
        self.pins: dict[str, tuple[Address, float]] = {}

    def __len__(self) -> int:
        return len(self.pins)

    def get(self, client_ip: str, now: float) -> Address | None:
        """The address ``client_ip`` is pinned to, or None (no pin, or an expired one)."""
        self.lookups += 1
        if self.lookups % _SWEEP_EVERY == 0:
            self.sweep(now)
        pin = self.pins.get(client_ip)
        if pin is None:
            return None
        if now - pin[1] < self.timeout:
            return pin[0]
        del self.pins[client_ip]
        return None

    def pin(self, client_ip: str, address: Address, now: float) -> None:
        """Pin (or re-pin) ``client_ip`` to ``address``; its timer restarts at ``now``."""
        self.pins[client_ip] = (address, now)

    def forget(self, client_ip: str, address: Address) -> None:
        """Drop the pin of ``client_ip`` if it points at ``address`` (a failed dial)."""
        pin = self.pins.get(client_ip)
        if pin is not None and pin[0] == address:
            del self.pins[client_ip]

    def retain(self, addresses: Container[Address]) -> None:
        """Keep only live pins to ``addresses`` (the endpoints of every pool of the port)."""
        now = self.clock()
        timeout = self.timeout
        dropped = [
            ip
            for ip, (address, last) in self.pins.items()
            if address not in addresses or now - last >= timeout
        ]
        for ip in dropped:
            del self.pins[ip]

    def sweep(self, now: float) -> None:
        timeout = self.timeout
        expired = [ip for ip, (_, last) in self.pins.items() if now - last >= timeout]
        for ip in expired:
            del self.pins[ip]


class AffinityTables:
    """The ``AffinityTable`` of every Service port with ClientIP affinity.

    Pools take their port's table with ``table`` (created on first use); the listener set
    calls ``sync`` whenever a Service's listeners are set, which forgets the tables of the
    Service's ports that are gone or lost affinity and drops pins to endpoints that left
    every pool of the port.  Invariant after a ``sync``: a Service's tables are those of
    its ports with affinity, and their pins name endpoints of those ports' pools only.
    """

    __slots__ = ("_clock", "_tables")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tables: dict[ServiceKey, dict[ServicePortName, AffinityTable]] = {}

    def __len__(self) -> int:
        return sum(len(ports) for ports in self._tables.values())

    def get(self, spn: ServicePortName) -> AffinityTable | None:
        ports = self._tables.get(ServiceKey(spn.namespace, spn.name))
        return None if ports is None else ports.get(spn)

    def table(self, spn: ServicePortName, timeout: float) -> AffinityTable:
        """The table of ``spn``; ``timeout`` is the Service's, the same for all its pools."""
        ports = self._tables.setdefault(ServiceKey(spn.namespace, spn.name), {})
        table = ports.get(spn)
        if table is None:
            table = ports[spn] = AffinityTable(timeout, self._clock)
        else:
            table.timeout = timeout
        return table

    def sync(self, service: ServiceKey, specs: Iterable[ListenerSpec]) -> None:
        """``service`` now wants ``specs`` (empty: it is gone): trim its tables to them."""
        ports = self._tables.get(service)
        if ports is None:
            return
        wanted: dict[ServicePortName, set[Address]] = {}
        for spec in specs:
            if spec.pool.affinity_timeout is None:
                continue
            addresses = wanted.setdefault(spec.spn, set())
            for pool in (spec.pool, spec.node_pool):
                if pool is not None:
                    addresses.update(str(e) for e in pool.endpoints)
        for spn in list(ports):
            keep = wanted.get(spn)
            if keep is None:
                del ports[spn]  # the port is gone or has no affinity any more
            else:
                ports[spn].retain(keep)
        if not ports:
            del self._tables[service]


class ClientIPAffinity:
    """Pins each client IP to the endpoint a pick chose, over any inner balancer.

    ``table`` is the Service port's shared ``AffinityTable`` (its owner trims it to the
    endpoints of all the port's pools), or a timeout: then the wrapper has a private table
    that follows this one pool (pins to endpoints it loses are dropped on ``renew``).

    Invariants: ``pick`` returns a pinned endpoint only if it is one of ``endpoints`` and
    not excluded, else the inner balancer's pick, and pins the client to what it returns;
    O(1) per pick (two dict lookups, one tuple for the pin).
    """

    __slots__ = ("_inner", "_members", "_private", "_table")

    #: Set once by a ``--workers`` process (N > 1): pick by a rendezvous hash of the
    #: client IP, the same in every worker (see the module docstring).
    deterministic: ClassVar[bool] = False

    def __init__(
        self,
        inner: Balancer,
        table: AffinityTable | float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self._private = not isinstance(table, AffinityTable)
        self._table = table if isinstance(table, AffinityTable) else AffinityTable(table, clock)
        #: This pool's endpoints by address: pins name addresses (see the module).
        self._members: dict[Address, Endpoint] = {str(e): e for e in inner.endpoints}

    @property
    def endpoints(self) -> Sequence[Endpoint]:
        return self._inner.endpoints

    @property
    def inner(self) -> Balancer:
        return self._inner

    @property
    def table(self) -> AffinityTable:
        return self._table

    @property
    def timeout(self) -> float:
        return self._table.timeout

    def __len__(self) -> int:
        return len(self._table)

    def pick(self, client_ip: str, exclude: Container[Endpoint] = ()) -> Endpoint | None:
        # ``AffinityTable.get`` and ``pin`` inlined: this runs for every new connection.
        table = self._table
        now = table.clock()
        if ClientIPAffinity.deterministic:
            hashed = rendezvous(client_ip, self._members, exclude)
            if hashed is not None:
                table.pins[client_ip] = (str(hashed), now)
            return hashed
        table.lookups += 1
        if table.lookups % _SWEEP_EVERY == 0:
            table.sweep(now)
        pins = table.pins
        pin = pins.get(client_ip)
        if pin is not None and now - pin[1] < table.timeout:
            endpoint = self._members.get(pin[0])
            if endpoint is not None and endpoint not in exclude:
                pins[client_ip] = (pin[0], now)
                return endpoint
        picked = self._inner.pick(client_ip, exclude)
        if picked is not None:
            # A pool without the pinned endpoint (a Local pool, or a retry) moves the pin;
            # an expired pin is replaced here (or swept).
            pins[client_ip] = (str(picked), now)
        return picked

    def failed(self, client_ip: str, endpoint: Endpoint) -> None:
        self._table.forget(client_ip, str(endpoint))
        self._inner.failed(client_ip, endpoint)

    def renew(self, endpoints: Sequence[Endpoint]) -> Balancer:
        renewed = ClientIPAffinity(self._inner.renew(endpoints), self._table)
        if self._private:
            renewed._private = True
            self._table.retain(renewed._members)
        return renewed


def rendezvous(
    client_ip: str, members: dict[Address, Endpoint], exclude: Container[Endpoint] = ()
) -> Endpoint | None:
    """The endpoint of ``members`` (not excluded) with the highest hash of (client IP,
    endpoint address): the same in every process (blake2b, never Python's salted
    ``hash``), and only the clients of an endpoint that leaves move when the set changes."""
    key = client_ip.encode() + b"|"
    best: Endpoint | None = None
    best_score = b""
    for address, endpoint in members.items():
        if endpoint in exclude:
            continue
        score = hashlib.blake2b(key + address.encode(), digest_size=8).digest()
        if score > best_score:
            best, best_score = endpoint, score
    return best
