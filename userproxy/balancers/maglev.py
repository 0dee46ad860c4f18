"""Maglev: consistent hashing of the client IP through a lookup table.

Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load Balancer" (NSDI 2016),
section 3.4, as Envoy's ``MAGLEV`` policy and IPVS's ``mh`` scheduler use it:

* Each endpoint, named ``"ip:port"``, gets an ``offset`` (first hash mod M) and a ``skip``
  (second hash mod (M - 1), plus 1); its preference list over the M slots is
  ``(offset + j * skip) mod M``, a permutation because M is prime.
* The endpoints take turns, in a canonical order (sorted by name, so every proxy and every
  rebuild agrees), each claiming its most preferred slot still free, until all M slots are
  taken: each endpoint owns M/N slots, rounded up or down.
* A client's slot is a stable 64-bit hash (BLAKE2b, not Python's per-process ``hash``) of
  its IP mod M: the same client lands on the same endpoint on every node and after restarts.

When one of N endpoints leaves, its clients (about 1/N) move and very few others do (the
paper measures a few in a thousand; tests/balancers/test_maglev.py measures ours).

Building a table takes M Python-level claims: 15-30 ms for M = 65 537 (N = 3..100) on a
busy 2-core machine (bench/balancers.py prints it), one build per endpoint change of the
Service.  Tables are cached by (endpoint names, size), process-wide, so the several pools
of one Service port (ClusterIP, NodePort, external IPs, both traffic classes) and an
endpoint set that flaps back share one build.  The last claims, when few slots are left and
probing would walk far, are made from per-endpoint sorted lists of the free slots instead
(the result is exactly the paper's probe-only fill; a test checks it).

Invariants: ``pick`` returns an endpoint of the pool (None only for an empty pool); an
excluded pick walks on to the next slots of the table (deterministic, so a retried client
lands where the next clients of that slot range do) and returns an excluded endpoint only
when every endpoint is excluded.  A pick allocates O(1) (the IP's bytes and its digest).
"""

from __future__ import annotations

import functools
import hashlib
from array import array
from collections.abc import Container, Sequence

from userproxy.balancers.base import Balancer
from userproxy.model import Endpoint

#: The lookup table's size: a prime, about 100 x the endpoints of a large Service, as the
#: paper advises (Envoy's default too).
DEFAULT_TABLE_SIZE = 65537
#: Tables kept built (128 KiB each at 16 bits an entry).
_CACHED_TABLES = 32


def _endpoint_hashes(name: str) -> tuple[int, int]:
    """Two independent 64-bit hashes of an endpoint's name (the halves of one digest)."""
    digest = hashlib.blake2b(name.encode(), digest_size=16, person=b"userproxy-maglev").digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def client_hash(client_ip: str) -> int:
    """The client's stable 64-bit hash (the same on every node and after a restart)."""
    return int.from_bytes(hashlib.blake2b(client_ip.encode(), digest_size=8).digest(), "little")


@functools.lru_cache(maxsize=_CACHED_TABLES)
def build_table(names: tuple[str, ...], size: int = DEFAULT_TABLE_SIZE) -> array[int]:
    """The Maglev lookup table: ``table[slot]`` is an index into ``names``.

    ``size`` must be a prime (else a skip may not visit every slot) and ``names`` must not
    be empty.
    """
    count = len(names)
    offsets: list[int] = []
    skips: list[int] = []
    for name in names:
        first, second = _endpoint_hashes(name)
        offsets.append(first % size)
        skips.append(second % (size - 1) + 1)
    table = [-1] * size
    position = offsets[:]  # each endpoint's next slot in its preference list
    free = size
    # Probing costs about size / free per claim, so stop probing when few slots are left
    # and make the last claims from sorted free-slot lists, which cost count x free
    # (measured: the sum is least with count x free around 2 500).
    tail = max(64, min(1024, 2500 // count))
    turn = 0
    while free > tail:
        skip = skips[turn]
        slot = position[turn]
        while table[slot] >= 0:
            slot += skip
            if slot >= size:
                slot -= size
        table[slot] = turn
        slot += skip
        position[turn] = slot - size if slot >= size else slot
        free -= 1
        turn += 1
        if turn == count:
            turn = 0
    if free:
        _claim_tail(table, free, turn, offsets, skips)
    return array("H" if count <= 0xFFFF else "I", table)


def _claim_tail(
    table: list[int], free: int, turn: int, offsets: list[int], skips: list[int]
) -> None:
    """Finish the fill exactly as probing would: an endpoint's next claim is the free slot
    earliest in its preference list (everything before its position is taken)."""
    size = len(table)
    empty = [slot for slot in range(size) if table[slot] < 0]
    orders: list[list[int]] = []
    for offset, skip in zip(offsets, skips, strict=True):
        inverse = pow(skip, -1, size)  # slot -> index in this endpoint's permutation
        ranked = sorted([((slot - offset) * inverse % size, slot) for slot in empty])
        orders.append([slot for _, slot in ranked])
    cursor = [0] * len(offsets)
    count = len(offsets)
    while free:
        order = orders[turn]
        index = cursor[turn]
        while table[order[index]] >= 0:
            index += 1
        table[order[index]] = turn
        cursor[turn] = index + 1
        free -= 1
        turn += 1
        if turn == count:
            turn = 0


class Maglev:
    __slots__ = ("_endpoints", "_size", "_table")

    def __init__(self, endpoints: Sequence[Endpoint], size: int = DEFAULT_TABLE_SIZE) -> None:
        ordered = sorted(endpoints, key=str)
        self._endpoints: tuple[Endpoint, ...] = tuple(ordered)
        self._size = size
        self._table: array[int] | None = (
            build_table(tuple(str(e) for e in ordered), size) if ordered else None
        )

    @property
    def endpoints(self) -> Sequence[Endpoint]:
        return self._endpoints

    @property
    def table(self) -> array[int] | None:
        """The lookup table (indexes into ``endpoints``); None for an empty pool."""
        return self._table

    def pick(self, client_ip: str, exclude: Container[Endpoint] = ()) -> Endpoint | None:
        table = self._table
        if table is None:
            return None
        endpoints = self._endpoints
        size = self._size
        slot = client_hash(client_ip) % size
        endpoint = endpoints[table[slot]]
        if endpoint not in exclude:
            return endpoint
        if all(e in exclude for e in endpoints):
            return endpoint  # everything tried: go round again from the client's own slot
        # Walk on through the next slots: each endpoint owns ~1/N of them, spread evenly,
        # so a non-excluded one comes within a few steps.
        while True:
            slot += 1
            if slot == size:
                slot = 0
            endpoint = endpoints[table[slot]]
            if endpoint not in exclude:
                return endpoint

    def failed(self, client_ip: str, endpoint: Endpoint) -> None:
        """The hash keeps no per-client state: a retry walks on through ``exclude``."""

    def renew(self, endpoints: Sequence[Endpoint]) -> Balancer:
        return Maglev(endpoints, self._size)
