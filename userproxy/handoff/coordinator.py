"""When each side of a handoff runs within one proxy's lifecycle (proxy.py drives it).

1. ``take()``, after every check that can end the process with exit 2 and before anything
   listens: checks the path (exit 2 if it is unsafe), asks a running process for its
   listening sockets, and offers them to ``listening_socket`` (hostnet/listen.py).
2. ``run(synced)``, a task of the proxy: once the first sync is applied (this process
   serves: its listeners took the sockets they want), tells the old process, closes the
   received sockets nothing took (this process's view has no listener there, so the
   kernel refuses, as a fresh start would), and then (or at once, when nothing was taken
   over, after the first sync) listens on the path itself and gives its own sockets to
   the next process.
3. Cancelling ``run`` stops listening on the path (the file is unlinked if it is still
   this process's).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from userproxy.handoff import path as handoff_path
from userproxy.handoff.giver import Giver, Host
from userproxy.handoff.taker import HandoffRefused, Takeover, connect
from userproxy.hostnet.listen import inherit, inherited_left

log = logging.getLogger(__name__)

__all__ = ["Handoff", "HandoffRefused"]


class Handoff:
    """``--handoff-socket`` for one proxy (``host``)."""

    def __init__(
        self,
        path: Path,
        host: Host,
        *,
        on_taken: Callable[[], None],
        on_given: Callable[[], None],
        on_refused: Callable[[str], None],
        addresses_device: str | None,
    ) -> None:
        self.path = path
        self.host = host
        self._on_taken = on_taken
        self._on_given = on_given
        self._on_refused = on_refused
        #: The device whose addresses this process manages (the old one keeps them then).
        self._device = addresses_device
        self._takeover: Takeover | None = None
        #: Set when this process listens on the path (tests and the bench wait on it).
        self.listening = asyncio.Event()

    @property
    def taking_over(self) -> bool:
        """Whether this process received sockets and has not yet told the old one."""
        return self._takeover is not None

    async def take(self) -> None:
        """Step 1 (see the module docstring); ConfigError for an unsafe path,
        HandoffRefused when the old process cannot be taken over from."""
        handoff_path.check(self.path)
        takeover = await connect(self.path)
        if takeover is None:
            return
        inherit((key, sock) for key, sock, _serves in takeover.sockets)
        self._takeover = takeover

    async def run(self, synced: Callable[[], Awaitable[object]]) -> None:
        """Step 2: wait for ``synced()``, finish a takeover, then serve the path."""
        takeover, self._takeover = self._takeover, None
        try:
            await synced()
        except BaseException:
            if takeover is not None:
                takeover.abandon()
                for _key, sock in inherited_left():
                    sock.close()
            raise
        if takeover is not None:
            await self._finish(takeover)
        bound = handoff_path.bind(self.path)
        giver = Giver(bound, self.host, self._on_given, self._on_refused)
        log.info("handoff: listening on %s for a successor", self.path)
        self.listening.set()
        try:
            await giver.serve()
        finally:
            giver.close()

    async def _finish(self, takeover: Takeover) -> None:
        left = inherited_left()
        received = {key for key, _sock, _serves in takeover.sockets}
        taken = received - {key for key, _sock in left}
        confirmed = await takeover.finish(taken, self._device)
        # After the old process stopped accepting: until then the sockets were its too.
        for key, sock in left:
            log.info("handoff: not serving %s %s:%d (no listener wants it here)", *key)
            sock.close()
        self._on_taken()
        log.info(
            "handoff: took over %d of %d listening sockets from pid %d%s",
            len(taken),
            len(received),
            takeover.giver_pid,
            "" if confirmed else " (it went away before confirming)",
        )
