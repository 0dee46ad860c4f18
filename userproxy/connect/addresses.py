"""A stable local address per Service for ``userproxy connect`` (127.x.y.z on Linux).

Every Service gets one address of the range (default ``DEFAULT_RANGE``), derived from a
hash of ``name.namespace``, so the same Service has the same address run after run and
machine after machine: a name in /etc/hosts, a bookmark or a database URL keeps working.
Two Services whose hashes meet: the one that asks second takes the next free address
after it (wrapping), so only colliding Services depend on the order they came in.

Invariants: an address is given to at most one Service at a time; it is never the
range's network or broadcast address (in a /31 or /32, every address may be used); a
released address is free again; ``AddressesExhausted`` when every address is taken.
"""

from __future__ import annotations

import hashlib
import ipaddress

__all__ = ["DEFAULT_RANGE", "AddressBook", "AddressesExhausted", "ServiceName"]

#: Far from 127.0.0.1 and from the ranges userproxy's own tests and demo use.
DEFAULT_RANGE = "127.77.0.0/16"

ServiceName = tuple[str, str]  # (namespace, name)


class AddressesExhausted(Exception):
    """Every address of the range is given to a Service."""


class AddressBook:
    """The address of each Service in ``network`` (a CIDR of IPv4 or IPv6 addresses)."""

    def __init__(self, network: str = DEFAULT_RANGE) -> None:
        self.network = ipaddress.ip_network(network, strict=True)
        size = self.network.num_addresses
        # Network and broadcast addresses are not given where there are such (not in /31, /32).
        self._first = 1 if size > 2 else 0
        self._count = size - 2 if size > 2 else size
        self._by_service: dict[ServiceName, str] = {}
        self._by_address: dict[str, ServiceName] = {}

    def __len__(self) -> int:
        return len(self._by_service)

    def get(self, service: ServiceName) -> str | None:
        return self._by_service.get(service)

    def assign(self, service: ServiceName) -> str:
        """The Service's address: the one it has, else its hash's, else the next free."""
        known = self._by_service.get(service)
        if known is not None:
            return known
        if len(self._by_address) >= self._count:
            raise AddressesExhausted(f"all {self._count} addresses of {self.network} are in use")
        namespace, name = service
        digest = hashlib.blake2b(f"{name}.{namespace}".encode(), digest_size=8).digest()
        slot = int.from_bytes(digest, "big") % self._count
        while True:
            address = str(self.network.network_address + self._first + slot)
            if address not in self._by_address:
                break
            slot = (slot + 1) % self._count
        self._by_service[service] = address
        self._by_address[address] = service
        return address

    def release(self, service: ServiceName) -> None:
        address = self._by_service.pop(service, None)
        if address is not None:
            del self._by_address[address]
