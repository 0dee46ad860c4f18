"""The common EndpointSlice endpoint decoded without the general decoder's bookkeeping.

Decoding 10 000 slices of 10 endpoints each is most of a large start: the general path
(``decode._slice_endpoint``) builds a field path for every field it reads, so that an error
can name it, and reads each field through a checking helper.  Nearly every endpoint is
plain (addresses, conditions, maybe nodeName and zone, no hints), so :func:`plain_endpoint`
checks that shape inline and builds the endpoint; anything else, or anything it would have
to reject, gives None and the general path decodes it again, naming the field.

Invariant: when it returns an endpoint, the general path returns an equal one.
"""

from __future__ import annotations

from userproxy.model import IPFamily, SliceEndpoint
from userproxy.sources.decode_fields import DecodeError, ip_literal, target_pod

__all__ = ["plain_endpoint"]

_NO_NAMES: frozenset[str] = frozenset()


def plain_endpoint(entry: object, family: IPFamily) -> SliceEndpoint | None:
    """``entry`` decoded, if it is a plain, valid endpoint with an address; else None."""
    if type(entry) is not dict or not _string_keys(entry):
        return None
    addresses = entry.get("addresses")
    if type(addresses) is not list or not addresses:
        return None
    hints = entry.get("hints")
    if hints is not None and hints != {}:
        return None
    conditions = entry.get("conditions")
    if conditions is None:
        conditions = {}
    elif type(conditions) is not dict or not _string_keys(conditions):
        return None
    ready = conditions.get("ready")
    serving = conditions.get("serving")
    terminating = conditions.get("terminating")
    node_name = entry.get("nodeName")
    zone = entry.get("zone")
    for value in (ready, serving, terminating):
        if value is not None and type(value) is not bool:
            return None
    for value in (node_name, zone):
        if value is not None and type(value) is not str:
            return None
    try:
        first = None
        for address in addresses:
            canonical = ip_literal(address, "", family)
            first = canonical if first is None else first
    except DecodeError:
        return None
    assert first is not None
    return SliceEndpoint(
        address=first,
        ready=True if ready is None else ready,
        serving=True if serving is None else serving,
        terminating=False if terminating is None else terminating,
        node_name=node_name or None,
        zone=zone or None,
        zone_hints=_NO_NAMES,
        node_hints=_NO_NAMES,
        pod=target_pod(entry.get("targetRef")),
    )


def _string_keys(mapping: dict[object, object]) -> bool:
    """Every key a string (the general path rejects a mapping with any other key)."""
    return all(type(key) is str for key in mapping)
