"""kube-proxy's IPVS scheduler names (``ipvs.scheduler``, ``--ipvs-scheduler``) as balancers.

kube-proxy's IPVS mode hands the scheduler name to the kernel (``ipvsadm -s NAME``) and gives
every real server weight 1 (EndpointSlices carry no weights).  userproxy reads the same name
and makes the closest of its balancers the default for every Service without the
``userproxy.io/balancer`` annotation.  Three kinds of names:

- same behaviour (with weight 1): ``rr``, ``lc``/``wlc``, ``sh``/``mh`` (consistent hash of
  the client address), ``sed``/``nq``/``twos`` (least active connections among few choices);
- approximated, reported once at start-up with the reason: ``wrr`` (weights), ``lblc``,
  ``lblcr`` and ``dh`` (the kernel hashes the *destination*: a Service's one virtual
  address, so all its clients share one real server; userproxy's nearest stable hash keys
  on the client);
- refused: ``fo`` and ``ovf`` are driven by weights alone (with weight 1, fo sends every
  connection to one server and ovf has no server left once each holds one connection):
  nothing here is close, so a guess would hide a real change of behaviour.

Names are the kernel's (net/netfilter/ipvs/ip_vs_*.c); ``""`` is kube-proxy's default (rr).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final


@dataclass(frozen=True, slots=True)
class Scheduler:
    """What one IPVS scheduler name selects.

    Invariant: ``balancer`` is None exactly when the name is refused; ``note`` is "" for an
    equivalent balancer, else why it is an approximation (or, refused, why nothing fits)."""

    balancer: str | None
    note: str = ""

    @property
    def approximated(self) -> bool:
        return self.balancer is not None and bool(self.note)


_NO_WEIGHTS = "EndpointSlices carry no weights"
_DESTINATION_HASH = (
    "the kernel hashes the destination address, which is the same for every client of a "
    "Service; maglev keeps the same kind of locality with a stable hash of the client address"
)

#: Every scheduler of the Linux kernel's IPVS, and what userproxy makes of it.
IPVS_SCHEDULERS: Final[Mapping[str, Scheduler]] = MappingProxyType(
    {
        "": Scheduler("round-robin"),  # kube-proxy: "IPVS scheduler not specified, use rr"
        "rr": Scheduler("round-robin"),
        "lc": Scheduler("least-connections"),
        "wlc": Scheduler("least-connections"),  # weight 1 everywhere: lc
        "sh": Scheduler("maglev"),
        "mh": Scheduler("maglev"),  # the kernel's mh is Maglev hashing
        "sed": Scheduler("power-of-two"),
        "nq": Scheduler("power-of-two"),
        "twos": Scheduler("power-of-two"),  # the kernel's "weighted random twos choice"
        "wrr": Scheduler("round-robin", f"{_NO_WEIGHTS}, so weighted round-robin is round-robin"),
        "lblc": Scheduler("maglev", f"locality-based least-connection: {_DESTINATION_HASH}"),
        "lblcr": Scheduler(
            "maglev", f"locality-based least-connection with replication: {_DESTINATION_HASH}"
        ),
        "dh": Scheduler("maglev", f"destination hashing: {_DESTINATION_HASH}"),
        "fo": Scheduler(
            None,
            f"weighted failover picks the available server of highest weight; {_NO_WEIGHTS}, "
            "so it would send every connection to one endpoint, and no built-in balancer does "
            "that (examples/balancer-plugin has a plug-in that does)",
        ),
        "ovf": Scheduler(
            None,
            f"weighted overflow fills servers up to their weight; {_NO_WEIGHTS}, so it would "
            "refuse connections once every endpoint holds one, and no balancer does that",
        ),
    }
)


def scheduler_rule(value: object) -> object:
    """The settings rule of ``ipvs_scheduler``: a name of ``IPVS_SCHEDULERS`` that is not
    refused (``ValueError`` says why, or lists the names)."""
    if not isinstance(value, str) or value not in IPVS_SCHEDULERS:
        names = ", ".join(name for name in IPVS_SCHEDULERS if name)
        raise ValueError(f"{value!r} is not an IPVS scheduler (one of {names})")
    scheduler = IPVS_SCHEDULERS[value]
    if scheduler.balancer is None:
        raise ValueError(
            f"{value!r} has no close userproxy balancer: {scheduler.note}; choose one with "
            "--balancer (or leave the scheduler unset)"
        )
    return value


def default_balancer(
    balancer: str | None, scheduler: str | None, fallback: str
) -> tuple[str, str | None]:
    """The default balancer of a proxy and what to report once at start-up (or None).

    An explicit ``balancer`` (``--balancer``, or ``balancer`` in the UserProxyConfiguration)
    wins over the IPVS ``scheduler``; with neither, ``fallback``.  ``scheduler`` has passed
    ``scheduler_rule``."""
    chosen = IPVS_SCHEDULERS[scheduler].balancer if scheduler is not None else None
    if balancer is not None:
        note = None
        if scheduler is not None:
            note = (
                f"the default balancer {balancer!r} (--balancer or balancer:) wins over the "
                f"IPVS scheduler {scheduler!r} (which would select {chosen!r})"
            )
        return balancer, note
    if scheduler is None or chosen is None:
        return fallback, None
    entry = IPVS_SCHEDULERS[scheduler]
    if entry.approximated:
        return chosen, (
            f"IPVS scheduler {scheduler!r} is approximated by the balancer {chosen!r}: {entry.note}"
        )
    return chosen, None
