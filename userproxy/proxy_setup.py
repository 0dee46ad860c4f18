"""The balancer registry a proxy starts with (``--balancer`` / ``--ipvs-scheduler``)."""

from __future__ import annotations

import logging

from userproxy.balancers.ipvs import default_balancer
from userproxy.balancers.registry import DEFAULT_BALANCER, BalancerRegistry, UnknownBalancer
from userproxy.config import ConfigError, Settings

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
