"""Validation and conversion of one raw API object into ``userproxy.model`` objects.

The input is a JSON- or YAML-decoded mapping (a manifest's or the API server's).  Every
value is checked for its type and range before it reaches a dataclass, so nothing typed
``Any`` crosses this boundary; a problem raises :class:`DecodeError` naming the field.

This module holds the rules of each kind (Service, EndpointSlice, Node), written out
because they cross fields (a headless Service has no second cluster IP, a nodePort needs
type NodePort or LoadBalancer); how one field is read and checked is in
:mod:`userproxy.sources.decode_fields`.  Where a rule is upstream's, it follows
pkg/apis/core/validation and pkg/proxy's endpointslicecache.go.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from userproxy.model import (
    BALANCER_ANNOTATION,
    DEFAULT_AFFINITY_TIMEOUT,
    MAX_AFFINITY_TIMEOUT,
    PROXY_PROTOCOL_ANNOTATION,
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
from userproxy.sources.decode_fast import plain_endpoint
from userproxy.sources.decode_fields import (
    MAX_FIELD_CHARS,
    MAX_MESSAGE_CHARS,
    DecodeError,
    as_mapping,
    cidr,
    decode_annotations,
    decode_labels,
    describe,
    ip_literal,
    meta_name,
    meta_namespace,
    metadata,
    opt_bool,
    opt_entries,
    opt_enum,
    opt_int,
    opt_items,
    opt_list,
    opt_mapping,
    opt_port,
    opt_str,
    quote,
    shorten,
    target_pod,
    unknown_value,
)

__all__ = [
    "HEADLESS_LABEL",
    "MAX_FIELD_CHARS",
    "MAX_MESSAGE_CHARS",
    "SERVICE_PROXY_NAME_LABEL",
    "DecodeError",
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

_HEADLESS_CLUSTER_IPS = ("", "None")


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
    meta = metadata(obj)
    name = meta_name(meta, label=True)
    namespace = meta_namespace(meta)
    decode_labels(obj)  # only validated: selection happens before decoding
    annotations = decode_annotations(obj)
    spec = opt_mapping(obj, "spec", "")
    status = opt_mapping(obj, "status", "")

    service_type = opt_enum(spec, "type", "spec", ServiceType, ServiceType.CLUSTER_IP)
    cluster_ips = _cluster_ips(spec)
    ports = _service_ports(spec, service_type)

    external_ips = tuple(ip_literal(v, p) for p, v in opt_items(spec, "externalIPs", "spec"))
    source_ranges = tuple(
        cidr(v, p) for p, v in opt_items(spec, "loadBalancerSourceRanges", "spec")
    )
    internal_policy = opt_enum(
        spec, "internalTrafficPolicy", "spec", TrafficPolicy, TrafficPolicy.CLUSTER
    )
    external_policy = opt_enum(
        spec, "externalTrafficPolicy", "spec", TrafficPolicy, TrafficPolicy.CLUSTER
    )

    health_check_node_port = opt_port(spec, "healthCheckNodePort", "spec")
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

    # Kept as written (stripped): planning checks it and warns once for a bad value, which
    # then sends no header; a typo here must not drop the whole Service.
    proxy_protocol = annotations.get(PROXY_PROTOCOL_ANNOTATION)
    if proxy_protocol is not None:
        proxy_protocol = proxy_protocol.strip()

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
        proxy_protocol=proxy_protocol,
    )


def _cluster_ips(spec: Mapping[str, object]) -> tuple[str, ...]:
    cluster_ip = opt_str(spec, "clusterIP", "spec")
    raw_ips = opt_list(spec, "clusterIPs", "spec")
    if not raw_ips:
        if cluster_ip is None or cluster_ip.strip() in _HEADLESS_CLUSTER_IPS:
            return ()
        return (ip_literal(cluster_ip, "spec.clusterIP"),)

    if len(raw_ips) > 2:
        raise DecodeError("spec.clusterIPs", f"has {len(raw_ips)} entries, at most 2 are allowed")
    first = raw_ips[0]
    if isinstance(first, str) and first.strip() in _HEADLESS_CLUSTER_IPS:
        if len(raw_ips) > 1:
            raise DecodeError("spec.clusterIPs", f"a headless Service has only {quote(first)}")
        if cluster_ip is not None and cluster_ip.strip() not in _HEADLESS_CLUSTER_IPS:
            raise DecodeError("spec.clusterIPs[0]", f"{quote(first)} differs from spec.clusterIP")
        return ()

    ips = tuple(ip_literal(value, f"spec.clusterIPs[{i}]") for i, value in enumerate(raw_ips))
    if (
        cluster_ip is not None
        and cluster_ip.strip() != ""
        and (cluster_ip.strip() == "None" or ip_literal(cluster_ip, "spec.clusterIP") != ips[0])
    ):
        raise DecodeError(
            "spec.clusterIPs[0]",
            f"{quote(ips[0])} differs from spec.clusterIP {quote(cluster_ip)}",
        )
    if len(ips) == 2 and IPFamily.of(ips[0]) is IPFamily.of(ips[1]):
        raise DecodeError("spec.clusterIPs[1]", f"{quote(ips[1])} has the same family as the first")
    return ips


def _service_ports(
    spec: Mapping[str, object], service_type: ServiceType
) -> tuple[ServicePort, ...]:
    raw_ports = opt_list(spec, "ports", "spec")
    ports: list[ServicePort] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_ports):
        path = f"spec.ports[{i}]"
        entry = as_mapping(raw, path)
        name = opt_str(entry, "name", path) or ""
        if not name and len(raw_ports) > 1:
            raise DecodeError(f"{path}.name", "is required when a Service has more than one port")
        if name in seen:
            raise DecodeError(
                f"{path}.name", f"{quote(name)} is already used by spec.ports[{seen[name]}]"
            )
        seen[name] = i
        protocol = _protocol(entry, path)
        port = opt_port(entry, "port", path)
        if port is None:
            raise DecodeError(f"{path}.port", "is required")
        node_port = opt_port(entry, "nodePort", path)
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
    value = opt_str(entry, "protocol", path)
    if value is None or value == "":
        return Protocol.TCP
    try:
        return Protocol(value)
    except ValueError:
        raise unknown_value(f"{path}.protocol", value, "TCP, UDP or SCTP", "protocol") from None


def _target_port(entry: Mapping[str, object], path: str) -> int | str | None:
    value = entry.get("targetPort")
    if value is None:
        return None
    field = f"{path}.targetPort"
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= 65535:
            raise DecodeError(field, f"{quote(value)} is out of range 1..65535")
        return value
    if isinstance(value, str):
        if not value:
            raise DecodeError(field, "must not be empty")
        return value
    raise DecodeError(field, f"expected an integer or a port name, got {describe(value)}")


def _affinity_timeout(spec: Mapping[str, object]) -> int | None:
    affinity = opt_str(spec, "sessionAffinity", "spec")
    if affinity is None or affinity in ("", "None"):
        return None
    if affinity != "ClientIP":
        raise unknown_value("spec.sessionAffinity", affinity, "None or ClientIP")
    config = opt_mapping(spec, "sessionAffinityConfig", "spec")
    client_ip = opt_mapping(config, "clientIP", "spec.sessionAffinityConfig")
    path = "spec.sessionAffinityConfig.clientIP"
    timeout = opt_int(client_ip, "timeoutSeconds", path)
    if timeout is None:
        return DEFAULT_AFFINITY_TIMEOUT
    if not 1 <= timeout <= MAX_AFFINITY_TIMEOUT:
        raise DecodeError(
            f"{path}.timeoutSeconds", f"{quote(timeout)} is out of range 1..{MAX_AFFINITY_TIMEOUT}"
        )
    return timeout


def _load_balancer_ingress(status: Mapping[str, object]) -> tuple[LoadBalancerIngress, ...]:
    load_balancer = opt_mapping(status, "loadBalancer", "status")
    result: list[LoadBalancerIngress] = []
    for path, entry in opt_entries(load_balancer, "ingress", "status.loadBalancer"):
        ip = entry.get("ip")
        ip_mode = opt_str(entry, "ipMode", path)
        if ip_mode is not None and ip_mode not in ("VIP", "Proxy"):
            raise unknown_value(f"{path}.ipMode", ip_mode, "VIP or Proxy")
        if ip is None or ip == "":
            continue  # a hostname-only entry: nothing for a service proxy to capture
        result.append(LoadBalancerIngress(ip=ip_literal(ip, f"{path}.ip"), ip_mode=ip_mode))
    return tuple(result)


def decode_endpoint_slice(obj: Mapping[str, object]) -> EndpointSlice | None:
    """Convert a raw discovery.k8s.io/v1 EndpointSlice (None for an FQDN slice)."""
    meta = metadata(obj)
    name = meta_name(meta, label=False)
    namespace = meta_namespace(meta)
    labels = decode_labels(obj)
    annotations = decode_annotations(obj)

    service_name = labels.get(SERVICE_NAME_LABEL, "")
    if not service_name:
        raise DecodeError(
            f"metadata.labels[{SERVICE_NAME_LABEL!r}]",
            "is required (it names the Service the slice belongs to)",
        )

    address_type = opt_str(obj, "addressType", "")
    if address_type is None:
        raise DecodeError("addressType", "is required (IPv4, IPv6 or FQDN)")
    if address_type == "FQDN":
        return None
    try:
        family = IPFamily(address_type)
    except ValueError:
        raise unknown_value("addressType", address_type, "IPv4, IPv6 or FQDN") from None

    ports = tuple(
        EndpointPort(
            name=opt_str(entry, "name", path) or "",
            protocol=_protocol(entry, path),
            port=opt_port(entry, "port", path),
        )
        for path, entry in opt_entries(obj, "ports", "")
    )
    endpoints = [
        _slice_endpoint(entry, path, family) for path, entry in opt_entries(obj, "endpoints", "")
    ]
    return EndpointSlice(
        namespace=namespace,
        name=name,
        service_name=service_name,
        address_type=family,
        ports=ports,
        endpoints=tuple(endpoint for endpoint in endpoints if endpoint is not None),
        trigger_time=_parse_time(annotations.get(TRIGGER_TIME_ANNOTATION)),
    )


def _slice_endpoint(
    entry: Mapping[str, object], path: str, family: IPFamily
) -> SliceEndpoint | None:
    plain = plain_endpoint(entry, family)  # the common shape, checked inline (decode_fast)
    return plain if plain is not None else general_endpoint(entry, path, family)


def general_endpoint(
    entry: Mapping[str, object], path: str, family: IPFamily
) -> SliceEndpoint | None:
    """One endpoint of a slice, any shape; DecodeError naming the field if it is invalid."""
    addresses = [ip_literal(v, p, family) for p, v in opt_items(entry, "addresses", path)]
    conditions = opt_mapping(entry, "conditions", path)
    conditions_path = f"{path}.conditions"
    # Unset conditions resolve as upstream kube-proxy does (pkg/proxy/endpointslicecache.go):
    # ready and serving default to true (independently), terminating to false.
    ready = opt_bool(conditions, "ready", conditions_path)
    serving = opt_bool(conditions, "serving", conditions_path)
    terminating = opt_bool(conditions, "terminating", conditions_path)
    node_name = opt_str(entry, "nodeName", path) or None
    zone = opt_str(entry, "zone", path) or None
    hints = opt_mapping(entry, "hints", path)
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
        pod=target_pod(entry.get("targetRef")),
    )


def _hint_names(hints: Mapping[str, object], key: str, path: str) -> frozenset[str]:
    names: set[str] = set()
    for hint_path, hint in opt_entries(hints, key, path):
        name = opt_str(hint, "name", hint_path)
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
    meta = metadata(obj)
    name = meta_name(meta, label=False)
    labels = decode_labels(obj)
    zone = labels.get(ZONE_LABEL) or None
    deleting = meta.get("deletionTimestamp") is not None
    spec = opt_mapping(obj, "spec", "")
    tainted = False
    for path, taint in opt_entries(spec, "taints", "spec"):
        key = opt_str(taint, "key", path)
        if not key:
            raise DecodeError(f"{path}.key", "is required")
        if key == TO_BE_DELETED_TAINT:
            tainted = True
    return Node(name=name, zone=zone, deleting=deleting, to_be_deleted_taint=tainted)
