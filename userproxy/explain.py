"""``userproxy explain``: why a connection from one client to one Service goes where it goes.

One code path for the three sources.  The objects (manifests, one LIST of the API, or the
running proxy's applied state) are planned by the real control plane: for manifests and
the API, ``check.plan_manifests``' path (a ``ChangeRecorder`` fed as a source feeds it,
then a ``Proxier`` with ``NoEffects``, see :func:`plan`), with the node's real addresses
(or ``--node-address``); a running proxy's ``Proxier`` has already done it.  The result,
a :class:`Planned`, is what :func:`explain_planned` explains, so the listeners and pools
explained are the ones ``run`` serves (or would serve).  The client is then classified as
a listener classifies it (``dataplane.classify.NodeLocal``, kube-proxy's
LocalTrafficDetector) and its pool chosen as ``Listener._pool_for`` chooses it (source
ranges first, then the node pool for a client on the node).  Only the *reasons* are
computed on the side (``explain_rules.py``, with the functions the plan used), and each
endpoint's verdict is checked against the planned pool, so explain cannot list a
candidate ``run`` would not use.

A running proxy adds its live state through a :class:`LiveView` (``explain_live.py``):
the outlier detector's ejections (avoided as the listener avoids them: unless every
endpoint of the pool is out), the client's ClientIP affinity pin (then the pinned
endpoint is the only candidate) and the balancer's next pick where it is deterministic.

Invariants: nothing is bound or served; ``candidates`` is the planned pool's endpoints for
that client and address (empty when the client is refused), less the ejected ones (unless
that leaves none), narrowed to the pinned endpoint when a live pin applies.  Without a
live view there is no affinity pin, no ejection and no load.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from userproxy.config import Settings
from userproxy.control.endpoints import build_endpoints
from userproxy.control.handlers import Handlers
from userproxy.control.proxier import NoEffects, Proxier
from userproxy.control.selection import topology_mode
from userproxy.control.trackers import ChangeRecorder
from userproxy.dataplane.classify import NodeLocal, in_networks, parse_networks
from userproxy.explain_rules import (
    ExplainError,
    LiveFacts,
    Pin,
    Step,
    Verdict,
    choose,
    class_step,
    fallback_step,
    hostport,
    listener_json,
    listeners_step,
    live_steps,
    live_verdict,
    maglev_pick,
    policy,
    static_steps,
    topology_step,
    verdict,
)
from userproxy.model import IPFamily, ListenerSpec, Service, ServiceKey, ServicePort
from userproxy.sources.manifest_files import ManifestState
from userproxy.sources.manifests import deliver_all

__all__ = [
    "ExplainError",
    "Explanation",
    "LiveFacts",
    "LiveView",
    "Pin",
    "Planned",
    "Step",
    "Verdict",
    "explain",
    "explain_planned",
    "hostport",
    "plan",
]


#: Services listed in the error for an unknown one; the rest are counted.
MAX_LISTED = 50

#: How each source names where the Services came from (in the unknown-Service error).
_WHERE = {
    "manifests": "in the manifests",
    "api": "from the API server",
    "server": "in the running proxy's applied state",
}


class LiveView(Protocol):
    """The live state of a running proxy, per listener pool."""

    def look(self, spec: ListenerSpec, node_pool: bool, client: str) -> LiveFacts:
        """The live facts of ``spec``'s pool (``node_pool``: the node pool) for ``client``."""


@dataclass(frozen=True, slots=True)
class Planned:
    """A planned state to explain: a ``Proxier`` after a sync (its applied state, plans and
    NodePort addresses), the node's client classifier and ``--cluster-cidr`` as the proxy
    has them, and the source's name ("manifests", "api" or "server")."""

    proxier: Proxier
    local: NodeLocal
    cluster_cidr: str | None
    source: str


@dataclass(frozen=True, slots=True)
class Explanation:
    """The chain of decisions for one (client, Service port, address)."""

    service: str
    port: str
    client: str
    client_class: str  # "node" (this node or --cluster-cidr) or "external"
    node: str
    address: str | None  # "ip:port" of the listener explained; None: none reachable
    listeners: tuple[dict[str, object], ...]
    steps: tuple[Step, ...]
    endpoints: tuple[Verdict, ...]
    candidates: tuple[str, ...]
    balancer: str | None
    affinity_timeout: int | None
    pick: str | None = None
    notes: tuple[str, ...] = field(default=())
    source: str = "manifests"
    #: The live ClientIP pin used for this client (a running proxy only), as an object
    #: ``{endpoint, expires_in, expires_at}``.
    affinity: dict[str, object] | None = None

    def as_json(self) -> dict[str, object]:
        """The ``-o json`` form: every field, steps and endpoints as objects."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Explanation:
        """The inverse of :meth:`as_json` (``--server``: the proxy's answer); ValueError
        when ``data`` is not one."""
        try:
            values = dict(data)
            values["steps"] = tuple(Step(**s) for s in _objects(values["steps"]))
            values["endpoints"] = tuple(Verdict(**v) for v in _objects(values["endpoints"]))
            values["listeners"] = tuple(_objects(values["listeners"]))
            for name in ("candidates", "notes"):
                values[name] = tuple(str(item) for item in _objects(values[name], dict_ok=False))
            return cls(**values)  # type: ignore[arg-type]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an explanation: {exc}") from None


def _objects(value: object, *, dict_ok: bool = True) -> list[dict[str, Any]]:
    """``value`` as a list of objects (TypeError when it is not a list, or, with
    ``dict_ok``, an item is not an object); ``Any``: the fields are checked by the
    dataclasses they are passed to (a missing or unknown field is a TypeError)."""
    if not isinstance(value, list) or (dict_ok and not all(isinstance(v, dict) for v in value)):
        raise TypeError("expected a list" + (" of objects" if dict_ok else ""))
    return value


def plan(
    settings: Settings, nodeport_addresses: Sequence[str], deliver: Callable[[Handlers], None]
) -> Proxier:
    """A ``Proxier`` (``NoEffects``) after one sync of what ``deliver`` hands its
    recorder: a first listing, complete (the three ``*_synced`` calls included)."""
    recorder = ChangeRecorder(settings.hostname, lambda: None)
    deliver(recorder)
    # Imported here: proxy.py imports the whole data plane; its resolution is run's own.
    from userproxy.proxy import _balancer_registry

    proxier = Proxier(
        recorder,
        NoEffects(),
        _balancer_registry(settings),
        node_addresses=lambda: tuple(nodeport_addresses),
    )
    proxier.sync()
    return proxier


def explain(
    state: ManifestState,
    settings: Settings,
    target: str,
    client: str,
    *,
    local: NodeLocal,
    nodeport_addresses: Sequence[str],
    to: str | None = None,
) -> Explanation:
    """:func:`explain_planned` over manifests (``--manifests``)."""
    proxier = plan(settings, nodeport_addresses, lambda h: deliver_all(state, h, settings.hostname))
    return explain_planned(
        Planned(proxier, local, settings.cluster_cidr, "manifests"), target, client, to=to
    )


def explain_planned(
    planned: Planned,
    target: str,
    client: str,
    *,
    to: str | None = None,
    live: LiveView | None = None,
) -> Explanation:
    """Explain a connection from ``client`` to ``target`` ("NAMESPACE/NAME[:PORT]"), to
    the address ``to`` ("IP" or "IP:PORT"; default: the ClusterIP for a client on the node,
    else the first external address).  Raises :class:`ExplainError` for a bad target."""
    proxier = planned.proxier
    service, port = _find(proxier.state.services, target, planned.source)
    node = proxier.node_name
    zone = proxier.state.zone
    nodeport_addresses = proxier.node_addresses
    spn = service.port_name(port)
    plan_of = proxier.plans.get(service.key)
    specs = [s for s in (plan_of.listeners if plan_of else ()) if s.spn == spn]
    on_node = planned.local.is_local(client)
    steps: list[Step] = [listeners_step(service, port, specs, nodeport_addresses)]
    steps.append(class_step(client, on_node, planned.cluster_cidr))
    spec = choose(specs, client, on_node, to)
    listeners = tuple(listener_json(s, client, on_node) for s in specs)
    base = functools.partial(
        Explanation,
        service=str(service.key),
        port=port.name or str(port.port),
        client=client,
        client_class="node" if on_node else "external",
        node=node,
        listeners=listeners,
        affinity_timeout=service.affinity_timeout,
        source=planned.source,
    )
    if spec is None:
        why = (
            "no address of this Service port is served"
            if not specs
            else "an outside client reaches only NodePorts, external and load-balancer IPs; "
            "this port has only ClusterIPs (pass --to to pick an address)"
        )
        steps.append(Step("address", why))
        return base(address=None, steps=tuple(steps), endpoints=(), candidates=(), balancer=None)
    address = hostport(spec.ip, spec.port)
    steps.append(Step("address", f"{address} ({spec.kind})"))
    if spec.source_ranges:
        allowed = in_networks(client, parse_networks(spec.source_ranges))
        ranges = ",".join(spec.source_ranges)
        what = f"is in {ranges}: allowed" if allowed else f"is not in {ranges}: refused"
        steps.append(Step("loadBalancerSourceRanges", f"{client} {what}"))
        if not allowed:
            return base(
                address=address,
                steps=tuple(steps),
                endpoints=(),
                candidates=(),
                balancer=spec.pool.balancer,
            )
    node_pool = spec.node_pool is not None and on_node
    pool = spec.node_pool if spec.node_pool is not None and on_node else spec.pool
    endpoints = build_endpoints(service, proxier.state.slices_of(service.key), node).get(
        (spn, IPFamily.of(spec.ip)), ()
    )
    policy_step, uses_local = policy(service, spec, on_node)
    steps.append(policy_step)
    mode = topology_mode(endpoints, node, zone)
    if not uses_local:
        steps.append(topology_step(endpoints, mode, node, zone))
    else:  # upstream filters only the cluster set by hints, never the local one
        steps.append(Step("topology hints: not applied", "the Local policy's set ignores hints"))
    facts = live.look(spec, node_pool, client) if live is not None else None
    verdicts = tuple(
        live_verdict(
            verdict(e, pool.endpoints, uses_local=uses_local, mode=mode, node=node, zone=zone),
            facts,
        )
        for e in endpoints
    )
    steps.append(fallback_step(endpoints, pool.endpoints, uses_local))
    planned_pool = tuple(hostport(e.ip, e.port) for e in pool.endpoints)
    if not planned_pool:
        steps.append(
            Step(
                "no endpoints", "the pool is empty: the connection is refused (kube-proxy's REJECT)"
            )
        )
    if facts is None:
        candidates, pin, more = (
            planned_pool,
            None,
            static_steps(service, client, pool, planned.source),
        )
    else:
        candidates, pin, more = live_steps(service, client, planned_pool, facts)
    steps += more
    return base(
        address=address,
        steps=tuple(steps),
        endpoints=verdicts,
        candidates=candidates,
        balancer=pool.balancer,
        pick=pin.endpoint
        if pin is not None
        else facts.next_pick
        if facts
        else maglev_pick(client, pool),
        affinity=dataclasses.asdict(pin) if pin is not None else None,
    )


def _find(
    services: Mapping[ServiceKey, Service], target: str, source: str
) -> tuple[Service, ServicePort]:
    name, _, port_text = target.partition(":")
    namespace, slash, short = name.partition("/")
    if not slash:
        namespace, short = "default", name
    service = services.get(ServiceKey(namespace, short))
    if service is None:
        # The first MAX_LISTED by name, without sorting them all (a proxy may hold 10 000).
        first = heapq.nsmallest(MAX_LISTED, services.items(), key=lambda item: str(item[0]))
        known = [f"{key}:{_ports(s)}" for key, s in first]
        if len(services) > MAX_LISTED:
            known.append(f"and {len(services) - MAX_LISTED} more")
        raise ExplainError(
            f"no Service {namespace}/{short} {_WHERE.get(source, '')}; there are: "
            + (", ".join(known) or "none")
        )
    if not service.is_proxied:
        raise ExplainError(f"Service {service.key} is not proxied (headless or ExternalName)")
    matches = [p for p in service.ports if not port_text or port_text in (p.name, str(p.port))]
    if len(matches) != 1:
        what = f"no port {port_text!r}" if not matches else "several ports; name one"
        raise ExplainError(f"Service {service.key} has {what}; its ports: {_ports(service)}")
    return service, matches[0]


def _ports(service: Service) -> str:
    return ",".join(f"{p.name or p.port}" for p in service.ports) or "(none)"
