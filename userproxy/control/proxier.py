"""The proxier: applies pending changes and computes the desired listeners per Service.

``sync()`` is what the sync runner calls.  It takes the recorder's pending changes, folds
them into the applied state (Services, EndpointSlices by Service, the own Node), and for
each Service the changes touch it computes the listeners it wants: one per (ServicePort,
cluster IP), each with the endpoints the selection rules allow for ClusterIP traffic.  Only
Services whose wanted listeners differ from the last sync are handed to the listener set,
so a change that does not alter the result causes no churn at all.

A Service whose plan could not be applied (the listener set raised: out of descriptors, an
address taken, any exception) does not stop the others.  Its plan is recorded all the same
(the desired state: the change trackers have already let go of the change) and the Service
is remembered as failed: every later sync re-plans it and hands the plan on again, even if
unchanged, until it applies.  ``sync()`` returns False while any Service is failed, and the
sync runner retries (kube-proxy's proxiers call ``RetryAfter`` for the same reason).  The
failures of one sync are logged in one line, when they differ from the last line logged or
at most once a minute otherwise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from userproxy.balancers.registry import BalancerRegistry
from userproxy.control.endpoints import build_endpoints
from userproxy.control.selection import EndpointSets, categorize
from userproxy.control.trackers import ChangeRecorder, PendingChanges, SliceKey
from userproxy.model import (
    AddressKind,
    EndpointSlice,
    IPFamily,
    ListenerSpec,
    Node,
    PoolSpec,
    Service,
    ServiceKey,
    ServicePortName,
    ServiceType,
    TrafficPolicy,
)
from userproxy.slices import Slicer

log = logging.getLogger(__name__)

#: Unchanged failures are logged again (one line) at most this often.
FAILURE_LOG_INTERVAL = 60.0
#: Failed Services named in that line; the rest are counted.
FAILURES_NAMED = 3
#: A sync re-planning at least this many Services is bulk work (see userproxy.slices).
BULK_SERVICES = 1000


class ListenerApplier(Protocol):
    """What the proxier drives (``userproxy.dataplane.listener_set.ListenerSet``)."""

    def set_listeners(self, service: ServiceKey, specs: Sequence[ListenerSpec]) -> None:
        """Make the listeners of ``service`` exactly ``specs``; raise if some are not
        (after applying all it could): the proxier retries the Service."""


#: Called with (service, healthCheckNodePort or None, local ready endpoints) when that changes.
HealthCheckApplier = Callable[[ServiceKey, int | None, int], None]


@dataclass(frozen=True, slots=True)
class ServicePlan:
    """Everything one Service asks of the data plane after a sync."""

    listeners: tuple[ListenerSpec, ...] = ()
    #: ``healthCheckNodePort`` of an ``externalTrafficPolicy: Local`` load balancer.
    health_check_port: int | None = None
    #: Distinct node-local ready endpoint IPs over all ports (the health check's
    #: ``localEndpoints``, upstream ``LocalReadyEndpoints``): one pod counts once.
    local_endpoints: int = 0
    #: Service ports with a Local policy and no local endpoints, per policy.
    no_local_internal: int = 0
    no_local_external: int = 0
    #: The Service's own IPs (cluster, external, load-balancer VIPs) to make local.
    addresses: frozenset[str] = frozenset()


@dataclass(slots=True)
class SyncStatus:
    """What the last syncs did; read by health checks, metrics and the status page."""

    syncs: int = 0
    last_sync_at: float | None = None  # monotonic
    last_duration: float = 0.0
    last_queued_at: float | None = None  # monotonic time the applied changes were queued
    services_changed: int = 0
    slices_changed: int = 0
    #: Wall-clock delays from a slice's last-change-trigger-time to it being applied.
    programming_delays: list[float] = field(default_factory=list)
    #: kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=internal|external}
    no_local_internal: int = 0
    no_local_external: int = 0
    #: Services whose plan the last sync could not apply (retried by the next syncs).
    failed_services: int = 0
    #: Syncs in a row that left some Service failed.
    failed_syncs: int = 0


@dataclass(slots=True)
class _SyncRun:
    """One sync in progress: when it began, what it took, what it re-plans, what failed."""

    started: float
    changes: PendingChanges
    addresses: tuple[str, ...]
    #: The Services the folded changes touch.
    affected: set[ServiceKey] = field(default_factory=set)
    #: The Services that had failed before this sync (forced to re-apply).
    retry: set[ServiceKey] = field(default_factory=set)
    errors: dict[ServiceKey, Exception] = field(default_factory=dict)


class Proxier:
    def __init__(
        self,
        recorder: ChangeRecorder,
        listeners: ListenerApplier,
        registry: BalancerRegistry,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_synced: Callable[[SyncStatus], None] | None = None,
        node_addresses: Callable[[], Sequence[str]] = tuple,
        health_checks: HealthCheckApplier | None = None,
    ) -> None:
        self.recorder = recorder
        self.listeners = listeners
        self._node_addresses_of = node_addresses
        self.node_addresses: tuple[str, ...] = ()
        self._health_checks = health_checks
        self.registry = registry
        self.node_name = recorder.node_name
        self._clock = clock
        self._wall_clock = wall_clock
        self._on_synced = on_synced
        self.services: dict[ServiceKey, Service] = {}
        self.slices: dict[ServiceKey, dict[SliceKey, EndpointSlice]] = {}
        self.node: Node | None = None
        self.plans: dict[ServiceKey, ServicePlan] = {}
        #: Services whose last apply failed, with why: re-applied at every sync until done.
        self.failed: dict[ServiceKey, str] = {}
        #: Why the node's addresses could not be read at the last sync (None: they were).
        self.addresses_error: str | None = None
        self._failure_logged: tuple[str, float] | None = None
        self.status = SyncStatus()
        # Trigger times older than the proxy describe changes some earlier process applied
        # (kube-proxy ignores those too); they would report hours of "latency" per restart.
        self._started_wall = wall_clock()

    def sync(self) -> bool:
        """Apply everything pending (and retry what failed before).  Does nothing until
        both initial listings are in.  False when some Service could not be applied."""
        run = self._begin()
        if run is None:
            return True
        for _ in self._fold(run):
            pass
        for key in self._keys(run):
            self._apply_one(run, key)
        return self._finish(run)

    async def sync_in_slices(self) -> bool:
        """``sync()`` in slices of a few milliseconds (``userproxy.slices``), so a sync
        that re-plans thousands of Services never holds the data plane up for long.

        Safe because nothing else touches the proxier's state meanwhile: the sources only
        record changes (the next sync folds them), and the runner starts no second sync
        until this one returns.  Services applied early in a sync serve their new plan
        while later ones still serve their old one, exactly as if the changes had arrived
        in two syncs.
        """
        run = self._begin()
        if run is None:
            return True
        changes = run.changes
        slicer = Slicer(bulk=len(changes.services) + len(changes.slices) >= BULK_SERVICES)
        for _ in self._fold(run):
            await slicer.tick()
        keys = self._keys(run)
        slicer = Slicer(every=4, bulk=len(keys) >= BULK_SERVICES)
        for key in keys:
            self._apply_one(run, key)
            await slicer.tick()
        return self._finish(run)

    def _begin(self) -> _SyncRun | None:
        """Take the pending changes (None until both initial listings are in)."""
        if not self.recorder.initialized:
            return None
        started = self._clock()
        try:
            addresses = tuple(self._node_addresses_of())
            self.addresses_error = None
        except Exception as exc:
            # Keep the last addresses (read again at the retry): the pending changes must
            # be applied all the same.
            addresses = self.node_addresses
            self.addresses_error = _describe(exc)
        return _SyncRun(started, self.recorder.take(), addresses)

    def _keys(self, run: _SyncRun) -> list[ServiceKey]:
        """The Services this sync re-plans, in order: those the folded changes touched,
        those with NodePorts if the node's addresses changed, those that failed before."""
        affected = run.affected
        if run.addresses != self.node_addresses:
            self.node_addresses = run.addresses
            affected.update(key for key, svc in self.services.items() if svc.externally_accessible)
        run.retry = set(self.failed)
        # A fixed order, so which of two Services claiming one address wins is the same
        # every time.  (The one step not sliced: 40 000 keys sort in 15-50 ms.)
        return sorted(affected | run.retry, key=str)

    def _apply_one(self, run: _SyncRun, key: ServiceKey) -> None:
        try:
            self._apply(key, self.plan(key), force=key in run.retry)
        except Exception as exc:
            self.failed[key] = _describe(exc)
            run.errors[key] = exc
        else:
            self.failed.pop(key, None)

    def _finish(self, run: _SyncRun) -> bool:
        changes = run.changes
        status = self.status
        status.syncs += 1
        status.last_sync_at = self._clock()
        status.last_duration = status.last_sync_at - run.started
        status.last_queued_at = changes.queued_at
        status.services_changed = len(changes.services)
        status.slices_changed = len(changes.slices)
        now = self._wall_clock()
        status.programming_delays = [
            max(0.0, now - t) for t in changes.trigger_times if t > self._started_wall
        ]
        if run.affected:
            log.debug(
                "sync %d: %d services, %d slices changed, %d services re-planned in %.1f ms",
                status.syncs,
                status.services_changed,
                status.slices_changed,
                len(run.affected),
                status.last_duration * 1000,
            )
        self._report_failures(status, run.errors)
        if self._on_synced is not None:
            self._on_synced(status)
        return not self.failed and self.addresses_error is None

    def _report_failures(self, status: SyncStatus, errors: dict[ServiceKey, Exception]) -> None:
        failed = self.failed
        status.failed_services = len(failed)
        if not failed and self.addresses_error is None:
            if status.failed_syncs:
                log.info(
                    "sync %d: every Service applied again (after %d incomplete syncs)",
                    status.syncs,
                    status.failed_syncs,
                )
            status.failed_syncs = 0
            self._failure_logged = None
            return
        status.failed_syncs += 1
        keys = sorted(failed, key=str)
        parts = [f"{key}: {failed[key]}" for key in keys[:FAILURES_NAMED]]
        if len(keys) > FAILURES_NAMED:
            parts.append(f"and {len(keys) - FAILURES_NAMED} more")
        if self.addresses_error is not None:
            parts.insert(0, f"reading the node's addresses: {self.addresses_error}")
        line = "; ".join(parts)
        now = self._clock()
        logged = self._failure_logged
        if logged is not None and logged[0] == line and now - logged[1] < FAILURE_LOG_INTERVAL:
            log.debug("sync %d: still not applied: %s", status.syncs, line)
            return
        self._failure_logged = (line, now)
        log.warning(
            "sync %d incomplete, %d Service%s not fully applied, will retry: %s",
            status.syncs,
            len(keys),
            "" if len(keys) == 1 else "s",
            line,
        )
        for key in keys[:FAILURES_NAMED]:
            exc = errors.get(key)
            if exc is not None and not isinstance(exc, OSError):
                log.debug("applying %s failed", key, exc_info=exc)

    def _fold(self, run: _SyncRun) -> Iterator[None]:
        """Fold the run's changes into the applied state, collecting the Services to
        re-plan in ``run.affected``; yields after each change (a sliced sync's chance to
        let the loop run)."""
        changes = run.changes
        affected = run.affected
        for key, change in changes.services.items():
            affected.add(key)
            if change.current is None:
                self.services.pop(key, None)
            else:
                self.services[key] = change.current
            yield
        for slice_key, slice_change in changes.slices.items():
            if slice_change.previous is not None:
                owner = slice_change.previous.service_key
                affected.add(owner)
                by_name = self.slices.get(owner)
                if by_name is not None:
                    by_name.pop(slice_key, None)
                    if not by_name:
                        del self.slices[owner]
            if slice_change.current is not None:
                owner = slice_change.current.service_key
                affected.add(owner)
                self.slices.setdefault(owner, {})[slice_key] = slice_change.current
            yield
        if changes.node is not None:
            self.node = changes.node.current
            affected.update(self.services, self.plans)
        if self.status.syncs == 0:
            affected.update(self.services)

    def _apply(self, key: ServiceKey, plan: ServicePlan, *, force: bool = False) -> None:
        """Hand on what changed in ``key``'s plan (all of it with ``force``: the last
        attempt failed, so what was applied is unknown).  The plan is recorded first, as
        the desired state, even when applying it raises."""
        old = self.plans.get(key, ServicePlan())
        # Kept up to date per Service rather than summed over every plan at each sync.
        self.status.no_local_internal += plan.no_local_internal - old.no_local_internal
        self.status.no_local_external += plan.no_local_external - old.no_local_external
        if plan == ServicePlan():
            self.plans.pop(key, None)
        else:
            self.plans[key] = plan
        error: Exception | None = None
        if force or plan.listeners != old.listeners:
            try:
                self.listeners.set_listeners(key, plan.listeners)
            except Exception as exc:
                error = exc
        health = (plan.health_check_port, plan.local_endpoints)
        if self._health_checks is not None and (
            force or health != (old.health_check_port, old.local_endpoints)
        ):
            self._health_checks(key, *health)
        if error is not None:
            raise error

    @property
    def specs(self) -> dict[ServiceKey, tuple[ListenerSpec, ...]]:
        """The listeners each Service has now (Services with none are left out)."""
        return {key: plan.listeners for key, plan in self.plans.items() if plan.listeners}

    def service_addresses(self) -> frozenset[str]:
        """Every IP a served Service owns (cluster, external, LB VIPs): what
        ``--manage-addresses`` makes local."""
        return frozenset().union(*(plan.addresses for plan in self.plans.values()))

    def listener_specs(self, key: ServiceKey) -> tuple[ListenerSpec, ...]:
        """The listeners Service ``key`` wants now (empty when it is gone or not proxied)."""
        return self.plan(key).listeners

    def plan(self, key: ServiceKey) -> ServicePlan:
        """What Service ``key`` wants now: listeners for each of its addresses with the
        endpoints each traffic class may use, its health check, its counts."""
        service = self.services.get(key)
        if service is None or not service.is_proxied:
            return ServicePlan()
        endpoints = build_endpoints(service, self._slices_of(key), self.node_name)
        zone = self.node.zone if self.node is not None else None
        balancer = self.registry.resolve(service.balancer, str(key))
        affinity = service.affinity_timeout
        external_ips = (
            *service.external_ips,
            *(
                ingress.ip
                for ingress in service.load_balancer_ingress
                if ingress.ip_mode in (None, "VIP")  # "Proxy": traffic goes via the real LB
            ),
        )
        lb_ips = {i.ip for i in service.load_balancer_ingress if i.ip_mode in (None, "VIP")}
        families = {IPFamily.of(ip) for ip in service.cluster_ips}
        specs: dict[tuple[object, ...], ListenerSpec] = {}
        # Distinct IPs, as upstream's EndpointsMap.LocalReadyEndpoints counts them: one pod
        # behind a two-port Service is one local endpoint, not one per (ip, port).
        local_ready: set[str] = set()
        no_local_internal = no_local_external = 0
        for port in service.ports:
            spn = service.port_name(port)
            sets = {
                family: categorize(endpoints.get((spn, family), ()), service, self.node_name, zone)
                for family in families
            }
            for family_sets in sets.values():
                local_ready.update(e.ip for e in family_sets.local if e.ready)
            if service.internal_traffic_policy is TrafficPolicy.LOCAL and any(
                not s.local for s in sets.values()
            ):
                no_local_internal += 1
            if (
                service.externally_accessible
                and service.external_traffic_policy is TrafficPolicy.LOCAL
                and any(not s.local for s in sets.values())
            ):
                no_local_external += 1

            def add(
                kind: AddressKind,
                ip: str,
                number: int,
                external: bool,
                *,
                spn: ServicePortName = spn,
                sets: dict[IPFamily, EndpointSets] = sets,
            ) -> None:
                family = IPFamily.of(ip)
                if family not in sets:
                    return  # an address of a family the Service does not have
                chosen = sets[family]
                internal = PoolSpec(chosen.internal, balancer, affinity)
                spec = ListenerSpec(
                    spn,
                    kind,
                    ip,
                    number,
                    PoolSpec(chosen.external, balancer, affinity) if external else internal,
                    PoolSpec(chosen.cluster, balancer, affinity) if external else None,
                    service.load_balancer_source_ranges if ip in lb_ips else (),
                )
                specs.setdefault(spec.key, spec)

            for ip in service.cluster_ips:
                add(AddressKind.CLUSTER_IP, ip, port.port, external=False)
            if port.node_port is not None and service.type in (
                ServiceType.NODE_PORT,
                ServiceType.LOAD_BALANCER,
            ):
                for ip in self.node_addresses:
                    add(AddressKind.NODE_PORT, ip, port.node_port, external=True)
            for ip in external_ips:
                kind = AddressKind.LOAD_BALANCER if ip in lb_ips else AddressKind.EXTERNAL_IP
                add(kind, ip, port.port, external=True)
        health_port = (
            service.health_check_node_port
            if service.type is ServiceType.LOAD_BALANCER
            and service.external_traffic_policy is TrafficPolicy.LOCAL
            else None
        )
        return ServicePlan(
            listeners=tuple(specs.values()),
            health_check_port=health_port,
            local_endpoints=len(local_ready),
            no_local_internal=no_local_internal,
            no_local_external=no_local_external,
            addresses=frozenset((*service.cluster_ips, *external_ips)),
        )

    def _slices_of(self, key: ServiceKey) -> Iterable[EndpointSlice]:
        return self.slices.get(key, {}).values()


def _describe(exc: BaseException) -> str:
    """One line for the log: an OSError's strerror, else the exception and its words."""
    if isinstance(exc, OSError) and exc.strerror and not exc.filename:
        return exc.strerror
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
