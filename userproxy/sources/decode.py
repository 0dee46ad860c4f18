"""Validation and conversion of one raw API object into ``userproxy.model`` objects.

The input is a JSON- or YAML-decoded mapping (from a manifest file or the API server's raw
JSON).  Every value is checked for its type and range before it reaches a dataclass, so
nothing typed ``Any`` crosses this boundary.  A problem raises :class:`DecodeError`, which
names the offending field as a path such as ``spec.ports[1].port``.

Typing is strict on purpose: booleans must be real booleans, integers real integers (a
boolean is not an integer, and the string ``"80"`` is not a port).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import TypeVar

from userproxy.model import (
    BALANCER_ANNOTATION,
    DEFAULT_AFFINITY_TIMEOUT,
    MAX_AFFINITY_TIMEOUT,
    EndpointPort,
    EndpointSlice,
    IPFamily,
    LoadBalancerIngress,
    Node,
    Protocol,
    Service,
    ServicePort,
    ServiceType,
    SliceEndpoint,
    TrafficPolicy,
)

__all__ = [
    "HEADLESS_LABEL",
    "SERVICE_NAME_LABEL",
    "SERVICE_PROXY_NAME_LABEL",
    "TO_BE_DELETED_TAINT",
    "TRIGGER_TIME_ANNOTATION",
    "ZONE_LABEL",
    "DecodeError",
    "decode_annotations",
    "decode_endpoint_slice",
    "decode_labels",
    "decode_node",
    "decode_service",
    "is_selected",
    "shorten",
]

#: Label on a Service's EndpointSlices naming the Service they belong to.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
#: Label the EndpointSlice controller puts on the slices of headless Services.
HEADLESS_LABEL = "service.kubernetes.io/headless"
#: Label that hands a Service (and its slices) to an alternative service proxy.
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
#: EndpointSlice annotation with the time of the change that caused the slice's update.
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
#: Node label with the node's zone.
ZONE_LABEL = "topology.kubernetes.io/zone"
#: Taint key the cluster autoscaler puts on a node it is about to remove.
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

_SESSION_AFFINITY_NONE = "None"
_SESSION_AFFINITY_CLIENT_IP = "ClientIP"
_HEADLESS_CLUSTER_IPS = ("", "None")
_ADDRESS_TYPE_FQDN = "FQDN"
_IP_MODES = ("VIP", "Proxy")

_E = TypeVar("_E", bound=StrEnum)


#: Longest quoted value in a message (characters, ellipsis included).
MAX_QUOTED_CHARS = 200
#: Longest field path and message of a DecodeError (characters, ellipsis included).
MAX_FIELD_CHARS = 300
MAX_MESSAGE_CHARS = 400


def shorten(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, ending with an ellipsis when cut."""
    if len(text) <= limit:
        return text
    return text[: max(limit - 1, 0)] + "\u2026"


def _quote(value: object) -> str:
    """``repr(value)``, bounded: a 10 MB string in an object gives a short message.

    Strings are cut before ``repr`` so quoting never copies a huge value; an integer is
    shown by its digit count beyond 40 digits (its decimal spelling costs quadratic time).
    """
    if isinstance(value, str) and len(value) > MAX_QUOTED_CHARS:
        return shorten(repr(value[:MAX_QUOTED_CHARS]), MAX_QUOTED_CHARS)
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of {value.bit_length()} bits>"
    return shorten(repr(value), MAX_QUOTED_CHARS)


class DecodeError(ValueError):
    """A raw API object failed validation.

    ``field`` is the path of the offending field (``spec.ports[1].port``; ``""`` for the
    object itself) and ``message`` says what is wrong with it.  Invariant: both are
    bounded (:data:`MAX_FIELD_CHARS`, :data:`MAX_MESSAGE_CHARS`), whatever the object held.
    """

    def __init__(self, field: str, message: str) -> None:
        field = shorten(field, MAX_FIELD_CHARS)
        message = shorten(message, MAX_MESSAGE_CHARS)
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


# --------------------------------------------------------------------------- helpers


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: object) -> str:
    """A short description of a value of the wrong type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {_quote(value)}"
    if isinstance(value, float):
        return f"number {_quote(value)}"
    if isinstance(value, str):
        return f"string {_quote(value)}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a value of type {type(value).__name__}"


def _as_mapping(value: object, path: str) -> dict[str, object]:
    if not isinstance(value, Mapping):
        raise DecodeError(path, f"expected a mapping, got {_describe(value)}")
    result: dict[str, object] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise DecodeError(path, f"key {_quote(key)} is not a string")
        result[key] = item
    return result


def _opt_mapping(m: Mapping[str, object], key: str, path: str) -> dict[str, object]:
    """``m[key]`` as a mapping; absent or null gives an empty mapping."""
    value = m.get(key)
    if value is None:
        return {}
    return _as_mapping(value, _join(path, key))


def _opt_list(m: Mapping[str, object], key: str, path: str) -> list[object]:
    """``m[key]`` as a list; absent or null gives an empty list."""
    value = m.get(key)
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise DecodeError(_join(path, key), f"expected a list, got {_describe(value)}")
    return list(value)


def _opt_str(m: Mapping[str, object], key: str, path: str) -> str | None:
    value = m.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DecodeError(_join(path, key), f"expected a string, got {_describe(value)}")
    return value


def _opt_int(m: Mapping[str, object], key: str, path: str) -> int | None:
    value = m.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodeError(_join(path, key), f"expected an integer, got {_describe(value)}")
    return value


def _opt_bool(m: Mapping[str, object], key: str, path: str) -> bool | None:
    value = m.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise DecodeError(_join(path, key), f"expected a boolean, got {_describe(value)}")
    return value


def _opt_port(m: Mapping[str, object], key: str, path: str) -> int | None:
    """An optional port number in 1..65535 (absent or null gives None)."""
    value = _opt_int(m, key, path)
    if value is not None and not 1 <= value <= 65535:
        raise DecodeError(_join(path, key), f"{_quote(value)} is out of range 1..65535")
    return value


def _enum(m: Mapping[str, object], key: str, path: str, enum: type[_E], default: _E) -> _E:
    value = _opt_str(m, key, path)
    if value is None or value == "":
        return default
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum)
        raise DecodeError(
            _join(path, key), f"unknown value {_quote(value)} (expected one of {allowed})"
        ) from None


@functools.lru_cache(maxsize=1 << 16)
def _parse_ip(text: str) -> tuple[str, IPFamily] | str:
    """(canonical spelling, family) of a literal IP, or why it is not one.

    Cached: parsing with ``ipaddress`` dominated decoding large EndpointSlice lists, and
    the same addresses come back at every reload and re-list.
    """
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return "is not a valid IP address"
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return "is not a valid IP address (zone index)"
    family = IPFamily.IPv6 if address.version == 6 else IPFamily.IPv4
    return (str(address), family)


#: Longer than any IP literal (IPv6 with an embedded IPv4 and blanks around it): checked
#: before parsing, so a huge string neither costs a parse nor fills the parse cache.
_MAX_IP_CHARS = 64


def _ip(value: object, path: str, family: IPFamily | None = None) -> str:
    """A literal IP address in its canonical spelling, optionally of one family."""
    if not isinstance(value, str):
        raise DecodeError(path, f"expected an IP address, got {_describe(value)}")
    if len(value) > _MAX_IP_CHARS:
        raise DecodeError(path, f"{_quote(value)} is not a valid IP address")
    parsed = _parse_ip(value)
    if isinstance(parsed, str):
        raise DecodeError(path, f"{_quote(value)} {parsed}")
    canonical, actual = parsed
    if family is not None and actual is not family:
        raise DecodeError(path, f"{_quote(value)} is not an {family.value} address")
    return canonical


def _cidr(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise DecodeError(path, f"expected a CIDR, got {_describe(value)}")
    if len(value) > _MAX_IP_CHARS + 4:
        raise DecodeError(path, f"{_quote(value)} is not a valid CIDR")
    try:
        network = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise DecodeError(path, f"{_quote(value)} is not a valid CIDR") from None
    return str(network)


def _string_map(m: Mapping[str, object], key: str, path: str) -> dict[str, str]:
    raw = _opt_mapping(m, key, path)
    result: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(value, str):
            raise DecodeError(
                f"{_join(path, key)}[{_quote(name)}]", f"expected a string, got {_describe(value)}"
            )
        result[name] = value
    return result


def _metadata(obj: Mapping[str, object]) -> dict[str, object]:
    if not isinstance(obj, Mapping):  # the type says so, but raw input is checked anyway
        raise DecodeError("", f"expected a mapping (an API object), got {_describe(obj)}")
    return _opt_mapping(obj, "metadata", "")


def _name(meta: Mapping[str, object], *, label: bool) -> str:
    name = _opt_str(meta, "name", "metadata")
    if not name:
        raise DecodeError("metadata.name", "is required")
    if label:
        if len(name) > 63 or not _DNS1123_LABEL.fullmatch(name):
            raise DecodeError(
                "metadata.name",
                f"{_quote(name)} is not a valid name (at most 63 lower-case letters, digits and "
                "'-', starting and ending with a letter or digit)",
            )
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(name):
        raise DecodeError(
            "metadata.name",
            f"{_quote(name)} is not a valid name (at most 253 lower-case letters, digits, '-' "
            "and '.', starting and ending with a letter or digit)",
        )
    return name


def _namespace(meta: Mapping[str, object]) -> str:
    namespace = _opt_str(meta, "namespace", "metadata")
    if not namespace:
        return "default"
    if len(namespace) > 63 or not _DNS1123_LABEL.fullmatch(namespace):
        raise DecodeError(
            "metadata.namespace", f"{_quote(namespace)} is not a valid namespace name"
        )
    return namespace


# --------------------------------------------------------------------------- public API


def decode_labels(obj: Mapping[str, object]) -> dict[str, str]:
    """``metadata.labels`` of a raw object (every value must be a string)."""
    return _string_map(_metadata(obj), "labels", "metadata")


def decode_annotations(obj: Mapping[str, object]) -> dict[str, str]:
    """``metadata.annotations`` of a raw object (every value must be a string)."""
    return _string_map(_metadata(obj), "annotations", "metadata")


def is_selected(labels: Mapping[str, str], proxy_name: str | None) -> bool:
    """Whether an object with these labels is this proxy's, as the watch selector says.

    Without a proxy name the selector is
    ``!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name``; with one
    it is ``!service.kubernetes.io/headless,service.kubernetes.io/service-proxy-name=<name>``.
    """
    if HEADLESS_LABEL in labels:
        return False
    if proxy_name is None:
        return SERVICE_PROXY_NAME_LABEL not in labels
    return labels.get(SERVICE_PROXY_NAME_LABEL) == proxy_name


def decode_service(obj: Mapping[str, object]) -> Service:
    """Convert a raw v1 Service into a :class:`Service` (raises :class:`DecodeError`)."""
    meta = _metadata(obj)
    name = _name(meta, label=True)
    namespace = _namespace(meta)
    decode_labels(obj)  # only validated: selection happens before decoding
    annotations = decode_annotations(obj)
    spec = _opt_mapping(obj, "spec", "")
    status = _opt_mapping(obj, "status", "")

    service_type = _enum(spec, "type", "spec", ServiceType, ServiceType.CLUSTER_IP)
    cluster_ips = _cluster_ips(spec)
    ports = _service_ports(spec, service_type)

    external_ips = tuple(
        _ip(value, f"spec.externalIPs[{i}]")
        for i, value in enumerate(_opt_list(spec, "externalIPs", "spec"))
    )
    source_ranges = tuple(
        _cidr(value, f"spec.loadBalancerSourceRanges[{i}]")
        for i, value in enumerate(_opt_list(spec, "loadBalancerSourceRanges", "spec"))
    )
    internal_policy = _enum(
        spec, "internalTrafficPolicy", "spec", TrafficPolicy, TrafficPolicy.CLUSTER
    )
    external_policy = _enum(
        spec, "externalTrafficPolicy", "spec", TrafficPolicy, TrafficPolicy.CLUSTER
    )

    health_check_node_port = _opt_port(spec, "healthCheckNodePort", "spec")
    if health_check_node_port is not None and not (
        service_type is ServiceType.LOAD_BALANCER and external_policy is TrafficPolicy.LOCAL
    ):
        raise DecodeError(
            "spec.healthCheckNodePort",
            "may only be set for type LoadBalancer with externalTrafficPolicy Local",
        )

    affinity_timeout = _affinity_timeout(spec)
    ingress = _load_balancer_ingress(status)

    balancer: str | None = None
    if BALANCER_ANNOTATION in annotations:
        balancer = annotations[BALANCER_ANNOTATION].strip()
        if not balancer:
            raise DecodeError(f"metadata.annotations[{BALANCER_ANNOTATION!r}]", "must not be empty")

    return Service(
        namespace=namespace,
        name=name,
        type=service_type,
        cluster_ips=cluster_ips,
        ports=ports,
        external_ips=external_ips,
        load_balancer_ingress=ingress,
        load_balancer_source_ranges=source_ranges,
        internal_traffic_policy=internal_policy,
        external_traffic_policy=external_policy,
        health_check_node_port=health_check_node_port,
        affinity_timeout=affinity_timeout,
        balancer=balancer,
    )


def _cluster_ips(spec: Mapping[str, object]) -> tuple[str, ...]:
    cluster_ip = _opt_str(spec, "clusterIP", "spec")
    raw_ips = _opt_list(spec, "clusterIPs", "spec")
    if not raw_ips:
        if cluster_ip is None or cluster_ip.strip() in _HEADLESS_CLUSTER_IPS:
            return ()
        return (_ip(cluster_ip, "spec.clusterIP"),)

    if len(raw_ips) > 2:
        raise DecodeError("spec.clusterIPs", f"has {len(raw_ips)} entries, at most 2 are allowed")
    first = raw_ips[0]
    if isinstance(first, str) and first.strip() in _HEADLESS_CLUSTER_IPS:
        if len(raw_ips) > 1:
            raise DecodeError("spec.clusterIPs", f"a headless Service has only {_quote(first)}")
        if cluster_ip is not None and cluster_ip.strip() not in _HEADLESS_CLUSTER_IPS:
            raise DecodeError("spec.clusterIPs[0]", f"{_quote(first)} differs from spec.clusterIP")
        return ()

    ips = tuple(_ip(value, f"spec.clusterIPs[{i}]") for i, value in enumerate(raw_ips))
    if (
        cluster_ip is not None
        and cluster_ip.strip() != ""
        and (cluster_ip.strip() == "None" or _ip(cluster_ip, "spec.clusterIP") != ips[0])
    ):
        raise DecodeError(
            "spec.clusterIPs[0]",
            f"{_quote(ips[0])} differs from spec.clusterIP {_quote(cluster_ip)}",
        )
    if len(ips) == 2 and IPFamily.of(ips[0]) is IPFamily.of(ips[1]):
        raise DecodeError(
            "spec.clusterIPs[1]", f"{_quote(ips[1])} has the same family as the first"
        )
    return ips


def _service_ports(
    spec: Mapping[str, object], service_type: ServiceType
) -> tuple[ServicePort, ...]:
    raw_ports = _opt_list(spec, "ports", "spec")
    ports: list[ServicePort] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_ports):
        path = f"spec.ports[{i}]"
        entry = _as_mapping(raw, path)
        name = _opt_str(entry, "name", path) or ""
        if not name and len(raw_ports) > 1:
            raise DecodeError(f"{path}.name", "is required when a Service has more than one port")
        if name in seen:
            raise DecodeError(
                f"{path}.name", f"{_quote(name)} is already used by spec.ports[{seen[name]}]"
            )
        seen[name] = i
        protocol = _protocol(entry, path)
        port = _opt_port(entry, "port", path)
        if port is None:
            raise DecodeError(f"{path}.port", "is required")
        node_port = _opt_port(entry, "nodePort", path)
        if node_port is not None and service_type not in (
            ServiceType.NODE_PORT,
            ServiceType.LOAD_BALANCER,
        ):
            raise DecodeError(
                f"{path}.nodePort",
                f"may not be set for type {service_type.value} (only NodePort or LoadBalancer)",
            )
        ports.append(
            ServicePort(
                name=name,
                protocol=protocol,
                port=port,
                node_port=node_port,
                target_port=_target_port(entry, path),
            )
        )
    return tuple(ports)


def _protocol(entry: Mapping[str, object], path: str) -> Protocol:
    value = _opt_str(entry, "protocol", path)
    if value is None or value == "":
        return Protocol.TCP
    try:
        return Protocol(value)
    except ValueError:
        raise DecodeError(
            f"{path}.protocol", f"unknown protocol {_quote(value)} (expected TCP, UDP or SCTP)"
        ) from None


def _target_port(entry: Mapping[str, object], path: str) -> int | str | None:
    value = entry.get("targetPort")
    if value is None:
        return None
    field = f"{path}.targetPort"
    if isinstance(value, bool):
        raise DecodeError(field, f"expected an integer or a port name, got {_describe(value)}")
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise DecodeError(field, f"{_quote(value)} is out of range 1..65535")
        return value
    if isinstance(value, str):
        if not value:
            raise DecodeError(field, "must not be empty")
        return value
    raise DecodeError(field, f"expected an integer or a port name, got {_describe(value)}")


def _affinity_timeout(spec: Mapping[str, object]) -> int | None:
    affinity = _opt_str(spec, "sessionAffinity", "spec")
    if affinity is None or affinity in ("", _SESSION_AFFINITY_NONE):
        return None
    if affinity != _SESSION_AFFINITY_CLIENT_IP:
        raise DecodeError(
            "spec.sessionAffinity", f"unknown value {_quote(affinity)} (expected None or ClientIP)"
        )
    config = _opt_mapping(spec, "sessionAffinityConfig", "spec")
    client_ip = _opt_mapping(config, "clientIP", "spec.sessionAffinityConfig")
    path = "spec.sessionAffinityConfig.clientIP"
    timeout = _opt_int(client_ip, "timeoutSeconds", path)
    if timeout is None:
        return DEFAULT_AFFINITY_TIMEOUT
    if not 1 <= timeout <= MAX_AFFINITY_TIMEOUT:
        raise DecodeError(
            f"{path}.timeoutSeconds", f"{_quote(timeout)} is out of range 1..{MAX_AFFINITY_TIMEOUT}"
        )
    return timeout


def _load_balancer_ingress(status: Mapping[str, object]) -> tuple[LoadBalancerIngress, ...]:
    load_balancer = _opt_mapping(status, "loadBalancer", "status")
    result: list[LoadBalancerIngress] = []
    for i, raw in enumerate(_opt_list(load_balancer, "ingress", "status.loadBalancer")):
        path = f"status.loadBalancer.ingress[{i}]"
        entry = _as_mapping(raw, path)
        ip = entry.get("ip")
        ip_mode = _opt_str(entry, "ipMode", path)
        if ip_mode is not None and ip_mode not in _IP_MODES:
            raise DecodeError(
                f"{path}.ipMode", f"unknown value {_quote(ip_mode)} (expected VIP or Proxy)"
            )
        if ip is None or ip == "":
            continue  # a hostname-only entry: nothing for a service proxy to capture
        result.append(LoadBalancerIngress(ip=_ip(ip, f"{path}.ip"), ip_mode=ip_mode))
    return tuple(result)


def decode_endpoint_slice(obj: Mapping[str, object]) -> EndpointSlice | None:
    """Convert a raw discovery.k8s.io/v1 EndpointSlice (None for an FQDN slice)."""
    meta = _metadata(obj)
    name = _name(meta, label=False)
    namespace = _namespace(meta)
    labels = decode_labels(obj)
    annotations = decode_annotations(obj)

    service_name = labels.get(SERVICE_NAME_LABEL, "")
    if not service_name:
        raise DecodeError(
            f"metadata.labels[{SERVICE_NAME_LABEL!r}]",
            "is required (it names the Service the slice belongs to)",
        )

    address_type = _opt_str(obj, "addressType", "")
    if address_type is None:
        raise DecodeError("addressType", "is required (IPv4, IPv6 or FQDN)")
    if address_type == _ADDRESS_TYPE_FQDN:
        return None
    try:
        family = IPFamily(address_type)
    except ValueError:
        raise DecodeError(
            "addressType", f"unknown value {_quote(address_type)} (expected IPv4, IPv6 or FQDN)"
        ) from None

    ports: list[EndpointPort] = []
    for i, raw in enumerate(_opt_list(obj, "ports", "")):
        path = f"ports[{i}]"
        entry = _as_mapping(raw, path)
        ports.append(
            EndpointPort(
                name=_opt_str(entry, "name", path) or "",
                protocol=_protocol(entry, path),
                port=_opt_port(entry, "port", path),
            )
        )

    endpoints: list[SliceEndpoint] = []
    for i, raw in enumerate(_opt_list(obj, "endpoints", "")):
        endpoint = _slice_endpoint(raw, f"endpoints[{i}]", family)
        if endpoint is not None:
            endpoints.append(endpoint)

    return EndpointSlice(
        namespace=namespace,
        name=name,
        service_name=service_name,
        address_type=family,
        ports=tuple(ports),
        endpoints=tuple(endpoints),
        trigger_time=_parse_time(annotations.get(TRIGGER_TIME_ANNOTATION)),
    )


def _slice_endpoint(raw: object, path: str, family: IPFamily) -> SliceEndpoint | None:
    entry = _as_mapping(raw, path)
    addresses = [
        _ip(value, f"{path}.addresses[{i}]", family)
        for i, value in enumerate(_opt_list(entry, "addresses", path))
    ]
    conditions = _opt_mapping(entry, "conditions", path)
    conditions_path = f"{path}.conditions"
    # Unset conditions resolve as upstream kube-proxy does (pkg/proxy/endpointslicecache.go):
    # ready and serving default to true (independently), terminating to false.
    ready = _opt_bool(conditions, "ready", conditions_path)
    serving = _opt_bool(conditions, "serving", conditions_path)
    terminating = _opt_bool(conditions, "terminating", conditions_path)
    node_name = _opt_str(entry, "nodeName", path) or None
    zone = _opt_str(entry, "zone", path) or None
    hints = _opt_mapping(entry, "hints", path)
    zone_hints = _hint_names(hints, "forZones", f"{path}.hints")
    node_hints = _hint_names(hints, "forNodes", f"{path}.hints")
    if not addresses:
        return None  # upstream ignores an endpoint without addresses
    return SliceEndpoint(
        address=addresses[0],
        ready=True if ready is None else ready,
        serving=True if serving is None else serving,
        terminating=False if terminating is None else terminating,
        node_name=node_name,
        zone=zone,
        zone_hints=zone_hints,
        node_hints=node_hints,
    )


def _hint_names(hints: Mapping[str, object], key: str, path: str) -> frozenset[str]:
    names: set[str] = set()
    for i, raw in enumerate(_opt_list(hints, key, path)):
        hint_path = f"{path}.{key}[{i}]"
        hint = _as_mapping(raw, hint_path)
        name = _opt_str(hint, "name", hint_path)
        if not name:
            raise DecodeError(f"{hint_path}.name", "is required")
        names.add(name)
    return frozenset(names)


def _parse_time(value: str | None) -> float | None:
    """An RFC 3339 time as a UNIX timestamp; None when unset or not a valid time."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None  # RFC 3339 requires an offset; a local time would be a guess
    return parsed.timestamp()


def decode_node(obj: Mapping[str, object]) -> Node:
    """Convert a raw v1 Node into a :class:`Node` (raises :class:`DecodeError`)."""
    meta = _metadata(obj)
    name = _name(meta, label=False)
    labels = decode_labels(obj)
    zone = labels.get(ZONE_LABEL) or None
    deleting = meta.get("deletionTimestamp") is not None
    spec = _opt_mapping(obj, "spec", "")
    tainted = False
    for i, raw in enumerate(_opt_list(spec, "taints", "spec")):
        path = f"spec.taints[{i}]"
        taint = _as_mapping(raw, path)
        key = _opt_str(taint, "key", path)
        if not key:
            raise DecodeError(f"{path}.key", "is required")
        if key == TO_BE_DELETED_TAINT:
            tainted = True
    return Node(name=name, zone=zone, deleting=deleting, to_be_deleted_taint=tainted)
