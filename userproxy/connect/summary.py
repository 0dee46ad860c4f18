"""The terminal summary of ``userproxy connect``: each Service, its name and local address,
its ports (``80->10080`` when moved up), its ready pods, and what is not served and why.

Printed at start and again after changes (``Summary.changed``, at most one print per
``DELAY`` seconds); a print that would repeat the last one is skipped.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import TextIO

from userproxy.connect.local_services import LocalService, LocalServices

__all__ = ["DELAY", "Summary", "render"]

#: Changes within this many seconds are printed together.
DELAY = 0.5


def _ports(local: LocalService) -> str:
    shown = [f"{p.port}->{p.local}" if p.local != p.port else str(p.port) for p in local.ports]
    return ",".join(shown) or "-"


def render(services: LocalServices) -> str:
    """The table, one line per Service (sorted by namespace and name), and its notes."""
    rows = [("SERVICE", "ADDRESS", "TCP PORTS", "READY PODS")]
    notes: list[str] = []
    for key in sorted(services.services):
        local = services.services[key]
        pods = services.ready_pods(key)
        name = f"{local.name}.{local.namespace}"
        rows.append((name, local.address or "-", _ports(local), " ".join(pods) or "(none)"))
        notes += [f"  {name}: {note}" for note in local.notes]
    if len(rows) == 1:
        return "no Services (yet)\n"
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "  "
        + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  "
        + row[3]
        for row in rows
    ]
    return "\n".join(lines + notes) + "\n"


class Summary:
    """Prints ``render(services)`` to ``out`` when asked and again after changes; calls
    ``after_print(services)`` with each print (the hosts file follows the same rhythm)."""

    def __init__(
        self,
        services: LocalServices,
        out: TextIO | None = None,
        after_print: Callable[[], None] = lambda: None,
    ) -> None:
        self.services = services
        self.out = out or sys.stdout
        self.after_print = after_print
        self._last = ""
        self._timer: asyncio.TimerHandle | None = None
        #: Changes are printed once this is set (after the first sync: before it, a
        #: table would show a half-read cluster).
        self.live = False

    def changed(self) -> None:
        """Something changed: print within ``DELAY`` seconds (once ``live``)."""
        if self.live and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(DELAY, self.print)

    def print(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        text = render(self.services)
        if text != self._last:
            self._last = text
            stamp = time.strftime("%H:%M:%S")
            try:
                self.out.write(f"{stamp} Services served here:\n{text}")
                self.out.flush()
            except (OSError, ValueError):  # a closed pipe or terminal: go on serving
                pass
        self.after_print()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
