"""Host networking helpers: local addresses, NodePort address selection, and the service IPs
userproxy makes local on its own device (``--manage-addresses``)."""

from __future__ import annotations

from userproxy.hostnet.addresses import (
    ADDRESS_PROTO,
    AddressManager,
    local_addresses,
    primary_addresses,
    select_nodeport_addresses,
)

__all__ = [
    "ADDRESS_PROTO",
    "AddressManager",
    "local_addresses",
    "primary_addresses",
    "select_nodeport_addresses",
]
