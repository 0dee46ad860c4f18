"""Warnings about manifests that are valid but would otherwise be dropped without a word.

A manifest can pass validation and still not do what its author meant (a misspelt kind, a
Service without a cluster IP ...: see :class:`Category`).  Kubernetes' own controllers
would have caught most of these before kube-proxy saw them; read from files, nothing does.
Each becomes a :class:`ManifestWarning` naming the file, the document (from 1), the object
and what happens to it.  Warnings never fail a load.

Two kinds of check:

- per object, while a file is read (:func:`type_warning`, :func:`cluster_ip_warning`):
  they travel with the file's cached contents, so an unchanged file is not checked again;
- across objects, over the merged state (:func:`cross_check`): a generator that yields
  None between objects, so the manifest source can run it in slices on the event loop
  (40 000 Services take about 100 ms in all) and ``load_manifests`` can run it through.

Invariants: the checks never raise for any decoded input, and what is logged is bounded
(:class:`WarningLog`).
"""

from __future__ import annotations

import difflib
import enum
import functools
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

from userproxy.model import EndpointSlice, IPFamily, Protocol, Service, ServiceKey, ServiceType
from userproxy.sources.decode import shorten

__all__ = [
    "LOGGED_PER_CATEGORY",
    "Category",
    "ManifestWarning",
    "WarningLog",
    "check_slice",
    "cluster_ip_warning",
    "cross_check",
    "service_conflicts",
    "summarize",
    "type_warning",
]

#: Warning lines of one category logged per reload; the rest are counted in one line.
LOGGED_PER_CATEGORY = 10

#: The types userproxy reads: kind -> apiVersion.
KNOWN_TYPES = {"Service": "v1", "EndpointSlice": "discovery.k8s.io/v1", "Node": "v1"}
_KNOWN_API_VERSIONS = tuple(sorted(set(KNOWN_TYPES.values())))
#: How alike (difflib's ratio) a kind must be to a known one to be taken for a misspelling.
#: 0.8 takes EndpointSlise, Serivce, service and Nodes, and leaves ServiceAccount (0.67),
#: ServiceEntry (0.74) and ServiceMonitor (0.67) alone.
KIND_CUTOFF = 0.8
#: The same for an apiVersion: discovery.k8s.io/v1beta1 (0.88) and discovery/v1 (0.77)
#: are close to discovery.k8s.io/v1; a CRD's group such as serving.knative.dev/v1 is not.
API_VERSION_CUTOFF = 0.6


class Category(enum.StrEnum):
    """What kind of silent drop a warning is about; the value describes the category."""

    UNREAD_TYPE = "objects of a type userproxy does not read, close to one it does"
    ENDPOINTS = "v1 Endpoints objects (userproxy reads EndpointSlices only)"
    NO_CLUSTER_IP = "Services with no clusterIP that are not headless (not proxied)"
    NO_SERVICE = "EndpointSlices whose Service is not in the manifests"
    UNMATCHED_PORT = "EndpointSlice ports that match no Service port"
    ADDRESS_CONFLICT = "addresses wanted by two Services (one of them is not served there)"


class ManifestWarning(NamedTuple):
    """One warning: ``where`` is "FILE: document N" (", items[i]" for list items),
    ``subject`` the object ("EndpointSlice shop/web-a").

    A NamedTuple on purpose: tens of thousands of them hash and compare in C when a
    reload asks which ones are new.
    """

    category: Category
    where: str
    subject: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.subject}: {self.message}"


# --------------------------------------------------------------------------- per object


def _close(word: str, candidates: Sequence[str], cutoff: float) -> str | None:
    """The candidate most like ``word`` (ignoring case first), if any is close enough."""
    for candidate in candidates:
        if candidate.lower() == word.lower():
            return candidate
    matches = difflib.get_close_matches(word, candidates, n=1, cutoff=cutoff)
    return matches[0] if matches else None


@functools.lru_cache(maxsize=256)
def type_warning(api_version: str, kind: str) -> tuple[Category, str] | None:
    """Why an object of a type userproxy does not read was probably meant to be read.

    None for the types it reads and for types nothing like them (a Deployment, a CRD's
    ``ServiceEntry``): those are ignored quietly, as kube-proxy never sees them either.
    Cached: a file of 50 000 objects of one misspelt kind asks difflib once, not 50 000
    times (a few types recur; the cache is bounded for files of many different ones).
    """
    if KNOWN_TYPES.get(kind) == api_version:
        return None
    if kind == "Endpoints" and api_version == "v1":
        return (
            Category.ENDPOINTS,
            "not read: kube-proxy and userproxy take endpoints from discovery.k8s.io/v1 "
            "EndpointSlices only (labelled kubernetes.io/service-name: <the Service>); "
            "write an EndpointSlice instead",
        )
    api_version = shorten(api_version, 80)
    if kind in KNOWN_TYPES:
        wanted = KNOWN_TYPES[kind]
        # Only an apiVersion of the core or discovery groups, or one close to the right
        # one: another group's kind of the same name (Knative's Service) is not a typo.
        if api_version in _KNOWN_API_VERSIONS or _close(api_version, [wanted], API_VERSION_CUTOFF):
            return (
                Category.UNREAD_TYPE,
                f"apiVersion {api_version} is not read (ignored); "
                f"did you mean apiVersion {wanted}?",
            )
        return None
    if not _close(api_version, _KNOWN_API_VERSIONS, API_VERSION_CUTOFF):
        return None  # another API group: its kinds are none of ours, however spelt
    meant = _close(kind, list(KNOWN_TYPES), KIND_CUTOFF)
    if meant is None:
        return None
    return (
        Category.UNREAD_TYPE,
        f"kind {shorten(kind, 60)} is not read (ignored); did you mean "
        f"apiVersion {KNOWN_TYPES[meant]}, kind {meant}?",
    )


def _declares_headless(obj: Mapping[str, object]) -> bool:
    """Whether the raw Service says ``clusterIP: None`` (or ``clusterIPs: [None]``)."""
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return False
    cluster_ips = spec.get("clusterIPs")
    first = cluster_ips[0] if isinstance(cluster_ips, list) and cluster_ips else None
    return any(
        isinstance(ip, str) and ip.strip() == "None" for ip in (spec.get("clusterIP"), first)
    )


def cluster_ip_warning(service: Service, obj: Mapping[str, object]) -> str | None:
    """Why ``service`` (decoded from ``obj``) will not be proxied, when that looks unmeant.

    A Service with no cluster IP is skipped as kube-proxy skips headless ones; in a
    cluster the API server assigns one, from a file nothing does.  Headless (``None``)
    and ExternalName Services are meant that way and get no warning.
    """
    if service.cluster_ips or service.type is ServiceType.EXTERNAL_NAME or _declares_headless(obj):
        return None
    return (
        "has no spec.clusterIP and is not headless (clusterIP: None): in a manifest nothing "
        "assigns one, so it is not proxied; set spec.clusterIP"
    )


# --------------------------------------------------------------------------- across objects


def _where(locations: Mapping[tuple[str, str, str], str], kind: str, ns: str, name: str) -> str:
    return locations.get((kind, ns, name), "(unknown file)")


def _subject(kind: str, namespace: str, name: str) -> str:
    return f"{kind} {shorten(f'{namespace}/{name}', 120)}"


def _port_text(name: str, protocol: Protocol) -> str:
    return f"{name or '(unnamed)'}/{protocol}"


#: A place a Service listens: (protocol, address or "node addresses", port).
_Claim = tuple[Protocol, str, int]
_NODE_ADDRESSES = "<node addresses>"


def _claims(service: Service) -> Iterator[tuple[_Claim, str]]:
    """The addresses ``service`` would listen on, as the proxier plans them, each with
    its kind (NodePorts on every node address stand for all of them)."""
    families = {IPFamily.of(ip) for ip in service.cluster_ips}
    vips = [i.ip for i in service.load_balancer_ingress if i.ip_mode in (None, "VIP")]
    for port in service.ports:
        for ip in service.cluster_ips:
            yield (port.protocol, ip, port.port), "ClusterIP"
        if port.node_port is not None and service.type in (
            ServiceType.NODE_PORT,
            ServiceType.LOAD_BALANCER,
        ):
            yield (port.protocol, _NODE_ADDRESSES, port.node_port), "NodePort"
        for ip in (*service.external_ips, *vips):
            if IPFamily.of(ip) in families:
                kind = "LoadBalancer" if ip in vips else "ExternalIP"
                yield (port.protocol, ip, port.port), kind


def _address(claim: _Claim) -> str:
    protocol, ip, port = claim
    shown = f"[{ip}]" if ":" in ip else ip
    return f"{protocol} {shown}:{port}"


def cross_check(
    services: Mapping[ServiceKey, Service],
    slices: Mapping[tuple[str, str], EndpointSlice],
    locations: Mapping[tuple[str, str, str], str],
) -> Iterator[ManifestWarning | None]:
    """Warnings that need more than one object, yielding None after each object.

    ``locations`` maps (kind, namespace, name) to where the object is defined.  Slices
    are checked against their Service's ports by name and protocol, as
    ``control/endpoints.py`` matches them; addresses are claimed in the order the
    Services come (file order), and a later claim names the earlier one.  The same as
    :func:`service_conflicts` followed by :func:`check_slice` for every slice.
    """
    yield from service_conflicts(services, locations)
    for key, endpoint_slice in slices.items():
        yield from check_slice(key, endpoint_slice, services, locations)
        yield None


def service_conflicts(
    services: Mapping[ServiceKey, Service], locations: Mapping[tuple[str, str, str], str]
) -> Iterator[ManifestWarning | None]:
    """Addresses claimed by two Services, yielding None after each Service."""
    claimed: dict[_Claim, ServiceKey] = {}
    for key, service in services.items():
        if service.is_proxied:
            for claim, kind in _claims(service):
                owner = claimed.setdefault(claim, key)
                if owner != key:
                    yield ManifestWarning(
                        Category.ADDRESS_CONFLICT,
                        _where(locations, "Service", key.namespace, key.name),
                        _subject("Service", key.namespace, key.name),
                        f"{_address(claim)} ({kind}) is also an address of Service {owner} "
                        f"({_where(locations, 'Service', owner.namespace, owner.name)}): one "
                        "address serves one Service, so one of them is not served there "
                        "(see userproxy_listener_conflicts)",
                    )
        yield None


def check_slice(
    key: tuple[str, str],
    endpoint_slice: EndpointSlice,
    services: Mapping[ServiceKey, Service],
    locations: Mapping[tuple[str, str, str], str],
) -> list[ManifestWarning]:
    """The warnings of one slice: its Service is absent, or a port matches none of the
    Service's.  They depend on the slice, its location and its Service only."""
    namespace, name = key
    where = _where(locations, "EndpointSlice", namespace, name)
    subject = _subject("EndpointSlice", namespace, name)
    target = services.get(endpoint_slice.service_key)
    if target is None:
        return [
            ManifestWarning(
                Category.NO_SERVICE,
                where,
                subject,
                f"its Service {endpoint_slice.service_key} (label kubernetes.io/service-name) "
                "is not among the Services read: its endpoints serve nothing",
            )
        ]
    found = []
    ports = {(port.name, port.protocol) for port in target.ports}
    for i, port in enumerate(endpoint_slice.ports):
        if (port.name, port.protocol) not in ports:
            known = ", ".join(_port_text(p.name, p.protocol) for p in target.ports)
            found.append(
                ManifestWarning(
                    Category.UNMATCHED_PORT,
                    where,
                    subject,
                    f"ports[{i}] {_port_text(port.name, port.protocol)} matches no port of "
                    f"Service {target.key} ({shorten(known or 'none', 200)}): its endpoints "
                    "serve nothing for it (ports match by name and protocol)",
                )
            )
    return found


# --------------------------------------------------------------------------- reporting


def summarize(warnings: Iterable[ManifestWarning], shown: int) -> Iterator[str]:
    """Lines for ``warnings``, grouped by category, at most ``shown`` per category and a
    count of the rest ("... and N more EndpointSlice ports that match no Service port")."""
    groups: dict[Category, list[ManifestWarning]] = {}
    for warning in warnings:
        groups.setdefault(warning.category, []).append(warning)
    for category in Category:
        group = groups.get(category, [])
        for warning in group[:shown]:
            yield str(warning)
        if len(group) > shown:
            yield f"... and {len(group) - shown} more {category.value}"


class WarningLog:
    """Logs each distinct warning once, however often the manifests are reloaded.

    ``report`` logs the warnings not logged before (bounded by :func:`summarize`) and
    forgets the ones that are gone, so a problem fixed and later brought back is logged
    again.  Not thread-safe: the manifest source calls it from its one task.
    """

    def __init__(self, logger: logging.Logger, shown: int = LOGGED_PER_CATEGORY) -> None:
        self._logger = logger
        self._shown = shown
        self._logged: frozenset[ManifestWarning] = frozenset()

    def report(self, warnings: Sequence[ManifestWarning]) -> int:
        """Log the new ones among ``warnings`` (the current full list); return how many."""
        if not warnings and not self._logged:
            return 0
        new = [w for w in dict.fromkeys(warnings) if w not in self._logged]
        self._logged = frozenset(warnings)
        for line in summarize(new, self._shown):
            self._logger.warning("manifest warning: %s", line)
        return len(new)
