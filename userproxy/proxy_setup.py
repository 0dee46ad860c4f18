"""What a proxy's data plane starts with: the balancer registry (``--balancer`` /
``--ipvs-scheduler``) and the listener set, sized and tuned by the settings."""

from __future__ import annotations

import logging

from userproxy.balancers.ipvs import default_balancer
from userproxy.balancers.registry import DEFAULT_BALANCER, BalancerRegistry, UnknownBalancer
from userproxy.config import ConfigError, Settings
from userproxy.dataplane.deadlines import TcpTimeouts
from userproxy.dataplane.limits import (
    ConnectionLimit,
    default_max_connections,
    default_udp_sessions,
    raise_nofile_limit,
    warn_if_over_nofile,
)
from userproxy.dataplane.listener_set import ListenerSet
from userproxy.dataplane.outliers import OutlierSettings
from userproxy.dataplane.udp_session import UdpSettings

#: The proxy's logger: the warning is the proxy's start-up line, as it was before this
#: function moved here (operators and tests look for it there).
log = logging.getLogger("userproxy.proxy")


def balancer_registry(settings: Settings) -> BalancerRegistry:
    """The registry with the configured default balancer (``--balancer``, else what
    ``--ipvs-scheduler`` selects): an approximated scheduler is reported here, once; an
    unknown name is a ``ConfigError`` naming the setting and listing the known balancers."""
    name, note = default_balancer(settings.balancer, settings.ipvs_scheduler, DEFAULT_BALANCER)
    if note:
        log.warning("%s", note)
    try:
        return BalancerRegistry(default=name)
    except UnknownBalancer as exc:
        setting = "balancer" if settings.balancer is not None else "ipvs_scheduler"
        problem = str(exc)
        if setting == "ipvs_scheduler":
            problem = f"{settings.ipvs_scheduler!r} selects the {problem}"
        raise ConfigError.of(setting, problem) from None


def listener_set(settings: Settings, registry: BalancerRegistry) -> ListenerSet:
    """The listener set of ``settings``: the connection limit (``--max-connections``,
    by default derived from the open-files limit, which is raised first; the shares per
    Service and client), the TCP timeouts, the UDP session limits, outlier ejection,
    endpoint drain."""
    nofile = raise_nofile_limit()
    udp_sessions = settings.udp_max_sessions or default_udp_sessions(nofile)
    maximum = settings.max_connections or default_max_connections(nofile, udp_sessions)
    warn_if_over_nofile(maximum, nofile, udp_sessions)
    limit = ConnectionLimit(
        maximum,
        service_share=settings.service_connection_share,
        client_share=settings.client_connection_share,
    )
    listeners = ListenerSet(
        registry,
        limit,
        TcpTimeouts(fin=settings.tcp_fin_timeout, idle=settings.tcp_idle_timeout),
        UdpSettings(
            idle_timeout=settings.udp_idle_timeout,
            max_sessions=udp_sessions,
            session_rate=settings.udp_session_rate,
        ),
        OutlierSettings(
            consecutive_failures=settings.outlier_consecutive_failures,
            base_ejection=settings.outlier_base_ejection,
            max_ejection=settings.outlier_max_ejection,
            max_ejected_percent=settings.outlier_max_ejected_percent,
        ),
    )
    listeners.endpoint_drain.after = settings.endpoint_drain
    return listeners
